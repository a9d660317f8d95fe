// Fused loss + gradient for cross-entropy (label smoothing, z-loss, logit softcap), focal and
// rescaled MSE (Zhou et al., NeurIPS 2022, "Are All Losses Created Equal: A Neural Collapse
// Perspective", eq. (3)-(6)).
//
// The work on one row is three shared pieces:
//   row_stats      one sweep over the logits (max, NaN flag, Σ_j w_j z_j, z_y), and a second
//                  over the cache-resident row computing exp(z - max) once per logit, stored
//                  (in the gradient buffer, or an fp32 scratch row for 16-bit logits) and summed;
//   row_result     a small per-loss function from the statistics to the loss and the gradient
//                  in the form g_j = a·v_j + c·u_j (j ≠ y), g_y = grad_target, where v_j is
//                  exp(z_j - max) (softmax losses) or z_j (MSE) and u_j the class weight;
//   write_gradient one sweep writing g (times the softcap's derivative when there is one).
// `loss_forward` runs them back to back per row (the row stays in cache). With the classes
// split across processes (vocabulary parallelism), `loss_row_stats` runs the first on each
// process's slice, the caller combines the statistics over processes, and
// `loss_from_stats` runs the other two, recomputing exp(z - max) from the global max.
#include <emmintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "common.h"
#include "transpose.h"

namespace ncfast {
namespace {

enum LossKind : int { kCrossEntropy = 0, kFocal = 1, kRescaledMSE = 2 };

struct LossOptions {
  int kind;
  double label_smoothing;
  double gamma;
  double kappa;
  double beta;
  double z_loss;   // λ of the z-loss λ·lse² (cross-entropy)
  double softcap;  // logits become softcap·tanh(z/softcap) first; 0: off
};

// Statistics of one row (or of this process's slice of it). For the MSE, `sumexp` holds
// Σ_{j≠y} z_j² and `max` is 0. The same layout is what processes exchange.
template <typename A>
struct RowStats {
  A max, sumexp, target_logit, weighted_sum, has_nan;
};
constexpr int kStatsFields = 5;

template <typename A>
struct RowResult {
  A loss, a, c, grad_target, lse;
};

// The logit as the loss sees it: capped by softcap·tanh(z/softcap) when asked.
template <bool kCap, typename T, typename A>
NCFAST_INLINE A load_logit(T value, A cap, A inv_cap) {
  A z = to_float(value);
  if constexpr (kCap) return cap * vtanh(z * inv_cap);
  return z;
}

// d(softcap·tanh(z/softcap))/dz = 1 - (capped/softcap)².
template <bool kCap, typename A>
NCFAST_INLINE A cap_derivative(A capped, A inv_cap) {
  if constexpr (kCap) return 1 - (capped * inv_cap) * (capped * inv_cap);
  return A(1);
}

struct Slice {
  int64_t num_classes;  // columns held here
  int64_t offset;       // global index of the first one
  int64_t total;        // K over all processes
};

// The block of columns that the statistics and gradient sweeps work on at a time (fits L1).
constexpr int64_t kRowBlock = 4096;

// Software prefetches of the logits, ahead of the loads (the hardware prefetcher stops at each
// 4 KiB page, and a core busy with arithmetic keeps too few lines in flight). The memory sweep
// of a block (its max) fetches 4 KiB ahead into L1; the exp sweep over the cache-resident
// block fetches the next block into L2, so that memory stays busy while the core computes.
// fp32 N=4096 K=32000: a read-only sweep takes 20-25 % less time with the first, the fused
// cross-entropy ≈ 10 % less with the second.
struct Prefetch {
  int64_t ahead_bytes;
  _mm_hint hint;
};
constexpr Prefetch kSweepPrefetch{4096, _MM_HINT_T0};
template <typename T>
constexpr Prefetch kNextBlockPrefetch{kRowBlock * static_cast<int64_t>(sizeof(T)), _MM_HINT_T1};

// Elements of T in one 64-byte cache line.
template <typename T>
constexpr int kLineElements = 64 / sizeof(T);

// Per-lane partial results of a memory sweep: lane q holds the columns j ≡ q (mod L), L being
// one cache line of logits, combined in a fixed order at the end (deterministic).
template <typename T, typename A>
struct Lanes {
  static constexpr int L = kLineElements<T>;
  A max[L], sum[L];
  int nan[L];
  NCFAST_INLINE explicit Lanes(A max0) {
    for (int q = 0; q < L; ++q) max[q] = max0, sum[q] = 0, nan[q] = 0;
  }
  NCFAST_INLINE void reduce(A& out_max, A& out_sum, int& out_nan) const {
    for (int q = 0; q < L; ++q) {
      out_max = max[q] > out_max ? max[q] : out_max;
      out_sum += sum[q];
      out_nan |= nan[q];
    }
  }
};

// Runs body(lane, j) for j in [0, n), one cache line of `z` per step with a prefetch `kAhead`
// of it (prefetches never fault, past the end included).
template <const Prefetch& kAhead, typename T, typename Body>
NCFAST_INLINE void sweep_lines(const T* z, int64_t n, Body&& body) {
  constexpr int L = kLineElements<T>;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    _mm_prefetch(reinterpret_cast<const char*>(z + j) + kAhead.ahead_bytes, kAhead.hint);
#pragma omp simd
    for (int q = 0; q < L; ++q) body(q, j + q);
  }
  for (; j < n; ++j) body(static_cast<int>(j % L), j);
}

// Σ_j value(j) over j in [0, n), swept as sweep_lines does, with per-lane partial sums held in
// registers and added in a fixed order at the end (deterministic).
template <const Prefetch& kAhead, typename A, typename T, typename Value>
NCFAST_INLINE A sweep_sum(const T* z, int64_t n, Value&& value) {
  constexpr int L = kLineElements<T>;
  A lanes[L] = {};
  sweep_lines<kAhead>(z, n, [&](int q, int64_t j) NCFAST_INLINE_LAMBDA { lanes[q] += value(j); });
  A sum = 0;
  for (int q = 0; q < L; ++q) sum += lanes[q];
  return sum;
}

// One row's statistics over its local columns. When `e` is given, it receives exp(z_j - m_b)
// and `block_ref[b]` the running max m_b it was taken against, for each block b.
template <bool kCap, bool kColumnWeights, typename T, typename A>
NCFAST_INLINE RowStats<A> row_stats(const T* z, int64_t y_local, const Slice& slice, const double* u, int kind,
                                    A cap, A inv_cap, A* e, A* block_ref) {
  const int64_t K = slice.num_classes;
  RowStats<A> s{0, 0, 0, 0, 0};
  const bool local_target = 0 <= y_local && y_local < K;
  if (local_target) s.target_logit = load_logit<kCap>(z[y_local], cap, inv_cap);
  if (kind == kRescaledMSE) {
    Lanes<T, A> lanes(0);
    sweep_lines<kSweepPrefetch>(z, K, [&](int q, int64_t j) NCFAST_INLINE_LAMBDA {
      A zj = load_logit<kCap>(z[j], cap, inv_cap);
      lanes.sum[q] += j == y_local ? A(0) : zj * zj;
      lanes.nan[q] |= (zj != zj);
    });
    A unused_max = 0;
    int has_nan = 0;
    lanes.reduce(unused_max, s.sumexp, has_nan);
    s.has_nan = has_nan;
    return s;
  }
  // One pass, a cache-resident block at a time: the block's max, then its exp against the
  // running max, so that the logits are read from memory once while the exp is computed. A
  // stored exp(z - m_block) is brought to the final max later by one multiply per block.
  const A minus_inf = -std::numeric_limits<A>::infinity();
  A max = minus_inf, weighted_sum = 0, sumexp = 0;
  int has_nan = 0;
  for (int64_t start = 0, b = 0; start < K; start += kRowBlock, ++b) {
    const int64_t n = std::min(kRowBlock, K - start);
    const T* zb = z + start;
    Lanes<T, A> lanes(minus_inf);
    sweep_lines<kSweepPrefetch>(zb, n, [&](int q, int64_t j) NCFAST_INLINE_LAMBDA {
      A zj = load_logit<kCap>(zb[j], cap, inv_cap);
      lanes.max[q] = zj > lanes.max[q] ? zj : lanes.max[q];
      lanes.nan[q] |= (zj != zj);
      if constexpr (kColumnWeights) {
        lanes.sum[q] += static_cast<A>(u[start + j]) * zj;
      } else {
        lanes.sum[q] += zj;
      }
    });
    A block_max = minus_inf;
    lanes.reduce(block_max, weighted_sum, has_nan);
    if (block_max > max) {
      if (max > minus_inf) sumexp *= vexp(max - block_max);
      max = block_max;
    }
    if (e) block_ref[b] = max;
    if (max == minus_inf) continue;  // all -inf so far: nothing to add
    if (e) {
      sumexp += sweep_sum<kNextBlockPrefetch<T>, A>(zb, n, [&](int64_t j) NCFAST_INLINE_LAMBDA {
        const A ej = vexp(load_logit<kCap>(zb[j], cap, inv_cap) - max);
        e[start + j] = ej;
        return ej;
      });
    } else {
      sumexp += sweep_sum<kNextBlockPrefetch<T>, A>(
          zb, n, [&](int64_t j) NCFAST_INLINE_LAMBDA { return vexp(load_logit<kCap>(zb[j], cap, inv_cap) - max); });
    }
  }
  s.max = max;
  s.sumexp = sumexp;
  s.weighted_sum = weighted_sum;
  s.has_nan = has_nan;
  return s;
}

// The elementary functions of the per-row math: the C library's on the row path (one row at a
// time), branch-free polynomials (common.h) where a tile of rows is computed across the SIMD
// lanes.
struct LibraryMath {
  template <typename A>
  NCFAST_INLINE static A log(A x) { return std::log(x); }
  template <typename A>
  NCFAST_INLINE static A expm1(A x) { return std::expm1(x); }
  template <typename A>
  NCFAST_INLINE static A pow_unit(A x, A g) { return std::pow(x, g); }  // pow(0, 0) = 1
};
struct LaneMath {
  template <typename A>
  NCFAST_INLINE static A log(A x) { return vlog(x); }
  template <typename A>
  NCFAST_INLINE static A expm1(A x) { return vexpm1(x); }
  template <typename A>
  NCFAST_INLINE static A pow_unit(A x, A g) { return vpow_unit(x, g); }
};

// log p_y and 1 - p_y = -expm1(log p_y), accurate as p_y -> 1 (as Liger-Kernel's PR #1329).
template <typename M, typename A>
NCFAST_INLINE void target_log_prob(const RowStats<A>& s, A& log_p, A& one_minus_p) {
  log_p = (s.target_logit - s.max) - M::log(s.sumexp);
  one_minus_p = -M::expm1(log_p);
}

// ℓ = (1-α) w_y (lse - z_y) + (α/K) Σ_j w_j (lse - z_j) + w_y λ lse²: torch's weighted label
// smoothing (w_y (lse - Σ q_j z_j), q = (1-α)e_y + α/K, without weights) plus the z-loss.
// g_j = p_j((1-α) w_y + α W/K + 2 w_y λ lse) - (α/K) w_j - (1-α) w_y δ_jy.
template <typename M, typename A>
NCFAST_INLINE RowResult<A> cross_entropy_row(const RowStats<A>& s, A w_y, A W, A num_classes, A smoothing, A z_loss) {
  A log_p, one_minus_p;
  target_log_prob<M>(s, log_p, one_minus_p);
  const A uniform = smoothing / num_classes, log_sumexp = M::log(s.sumexp), lse = s.max + log_sumexp;
  A loss = -(1 - smoothing) * w_y * log_p;
  if (smoothing > 0) {
    // Σ_j w_j (lse - z_j), written around the max so that it stays exact for large logits.
    loss += uniform * ((W * s.max - s.weighted_sum) + W * log_sumexp);
  }
  const A p_y = 1 - one_minus_p;
  A p_coef = (1 - smoothing) * w_y + uniform * W;
  // g_y without forming p_y - 1 in low precision.
  A grad_target = -(1 - smoothing) * w_y * one_minus_p + uniform * (W * p_y - w_y);
  if (z_loss > 0) {
    loss += w_y * z_loss * lse * lse;
    p_coef += 2 * w_y * z_loss * lse;
    grad_target += 2 * w_y * z_loss * lse * p_y;
  }
  return {loss, p_coef / s.sumexp, -uniform, grad_target, lse};
}

// ℓ = -w_y α_y (1-p_y)^γ log p_y;  g_j = w_y α_y c(δ_jy - p_j) with
// c = γ(1-p_y)^{γ-1} p_y log p_y - (1-p_y)^γ = (1-p_y)^γ (γ p_y · log p_y/(1-p_y) - 1),
// where log p_y/(1-p_y) -> -1 as p_y -> 1: finite for every γ ≥ 0, and γ = 0 gives CE exactly.
template <typename M, typename A>
NCFAST_INLINE RowResult<A> focal_row(const RowStats<A>& s, A w_y, A gamma, A alpha_y) {
  A log_p, one_minus_p;
  target_log_prob<M>(s, log_p, one_minus_p);
  const A factor = w_y * alpha_y;
  const A p = 1 - one_minus_p;
  const A modulator = M::pow_unit(one_minus_p, gamma);
  const A log_ratio = one_minus_p > 0 ? log_p / one_minus_p : A(-1);
  const A c = modulator * (gamma * p * log_ratio - 1);
  return {-factor * modulator * log_p, -factor * c / s.sumexp, A(0), factor * c * one_minus_p,
          s.max + M::log(s.sumexp)};
}

// ℓ = w_y (κ(z_y - β)² + Σ_{j≠y} z_j²);  g_j = 2 w_y z_j, g_y = 2 w_y κ(z_y - β).
template <typename A>
NCFAST_INLINE RowResult<A> rescaled_mse_row(const RowStats<A>& s, A w_y, A kappa, A beta) {
  const A d = s.target_logit - beta;
  return {w_y * (kappa * d * d + s.sumexp), 2 * w_y, A(0), 2 * w_y * kappa * d, A(0)};
}

// The loss and gradient coefficients of one row for a loss known at compile time. Everything is
// computed and the NaN row selected at the end (no branch), so that a loop over a tile of rows
// vectorises.
template <int kKind, typename M, typename A>
NCFAST_INLINE RowResult<A> row_result_of(const RowStats<A>& s, const LossOptions& opt, A w_y, A alpha_y, A W,
                                         int64_t num_classes) {
  const A nan = std::numeric_limits<A>::quiet_NaN();
  RowResult<A> r;
  bool bad;
  if constexpr (kKind == kRescaledMSE) {
    r = rescaled_mse_row<A>(s, w_y, A(opt.kappa), A(opt.beta));
    bad = s.has_nan != 0;
  } else {
    if constexpr (kKind == kFocal) {
      r = focal_row<M, A>(s, w_y, A(opt.gamma), alpha_y);
    } else {
      r = cross_entropy_row<M, A>(s, w_y, W, static_cast<A>(num_classes), A(opt.label_smoothing), A(opt.z_loss));
    }
    // NaN or +inf anywhere in the row (or all -inf): the row is NaN, as in torch.
    bad = s.has_nan != 0 || !(s.max - s.max == 0);
  }
  return bad ? RowResult<A>{nan, nan, nan, nan, nan} : r;
}

template <typename A>
NCFAST_INLINE RowResult<A> row_result(const RowStats<A>& s, const LossOptions& opt, A w_y, A alpha_y, A W,
                                      int64_t num_classes) {
  if (opt.kind == kRescaledMSE) return row_result_of<kRescaledMSE, LibraryMath>(s, opt, w_y, alpha_y, W, num_classes);
  if (opt.kind == kFocal) return row_result_of<kFocal, LibraryMath>(s, opt, w_y, alpha_y, W, num_classes);
  return row_result_of<kCrossEntropy, LibraryMath>(s, opt, w_y, alpha_y, W, num_classes);
}

// Where v_j comes from in the gradient sweep.
enum class Values { stored_exp, recomputed_exp, logits };

// Stores one cache line of gradient values, dst[q] = value(q) (`dst` 64-byte aligned), with
// streaming stores: the gradient is not read again here, so fetching its lines into the cache
// first (a write-allocate) would add half again to the memory traffic. The values are rounded
// straight into the line's registers (a line staged in fp32 on the stack first, stored and
// read back, cost a tenth of a bf16 tile's time where the stack and the source aliased).
// On AVX-512 the line goes out in one 64-byte store, not four of 16 bytes (kernel alone, one
// thread: 0.91-1.0x the time, bf16 (4096, 32000) MSE 0.91x).
#ifdef NCFAST_AVX512
NCFAST_AVX512 inline void stream_line64(void* dst, const void* line) {
  _mm512_stream_si512(static_cast<__m512i*>(dst), _mm512_load_si512(line));
}
#endif
template <typename T, typename Value>
NCFAST_INLINE void stream_line(T* dst, Value&& value) {
  alignas(64) T out[kLineElements<T>];
#pragma omp simd
  for (int q = 0; q < kLineElements<T>; ++q) out[q] = from_acc<T>(value(q));
#ifdef NCFAST_AVX512
  if (kHasAvx512) return stream_line64(dst, out);
#endif
  for (int k = 0; k < 4; ++k) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst) + k, _mm_load_si128(reinterpret_cast<const __m128i*>(out) + k));
  }
}

// Writes dst[j] = value(j) for j in [0, n), except dst[special] = special_value: each full
// cache line of dst is computed in registers and streamed, the elements before the first and
// after the last one are stored one by one (all of them if dst is not even aligned to its
// element size).
template <typename A, typename T, typename Value>
NCFAST_INLINE void write_lines(T* dst, int64_t n, int64_t special, A special_value, Value&& value) {
  constexpr int L = kLineElements<T>;
  const uintptr_t address = reinterpret_cast<uintptr_t>(dst);
  const int64_t to_line = static_cast<int64_t>((64 - address % 64) % 64 / sizeof(T));
  const int64_t head = address % sizeof(T) != 0 ? n : std::min(n, to_line);
  auto one = [&](int64_t j) NCFAST_INLINE_LAMBDA { dst[j] = from_acc<T>(j == special ? special_value : value(j)); };
  int64_t j = 0;
  for (; j < head; ++j) one(j);
  for (; j + L <= n; j += L) {
    const int64_t at_special = special - j;
    if (static_cast<uint64_t>(at_special) < static_cast<uint64_t>(L)) {  // the line holding it
      stream_line(dst + j, [&](int q) NCFAST_INLINE_LAMBDA { return q == at_special ? special_value : value(j + q); });
    } else {
      stream_line(dst + j, [&](int q) NCFAST_INLINE_LAMBDA { return value(j + q); });
    }
  }
  for (; j < n; ++j) one(j);
}

// g_j = (a·v_j + c·u_j)·cap'(z_j), with g_y = grad_target·cap'(z_y), computed a cache-resident
// block at a time and stored once.
template <Values kValues, bool kCap, bool kColumnWeights, typename T, typename A>
NCFAST_INLINE void write_gradient(T* g, const T* z, const A* e, const A* block_ref, const double* u, int64_t K,
                                  int64_t y_local, A grad_target, A max, A ga, A gc, A cap, A inv_cap) {
  for (int64_t start = 0, b = 0; start < K; start += kRowBlock, ++b) {
    const int64_t n = std::min(kRowBlock, K - start);
    A ga_block = ga;
    if constexpr (kValues == Values::stored_exp) ga_block = ga * vexp(block_ref[b] - max);
    write_lines<A>(g + start, n, y_local - start, grad_target, [&](int64_t j) NCFAST_INLINE_LAMBDA {
      A v, zj = 0;
      if constexpr (kCap || kValues != Values::stored_exp) zj = load_logit<kCap>(z[start + j], cap, inv_cap);
      if constexpr (kValues == Values::stored_exp) {
        v = e[start + j];
      } else if constexpr (kValues == Values::recomputed_exp) {
        v = vexp(zj - max);
      } else {
        v = zj;
      }
      A gj;
      if constexpr (kColumnWeights) {
        gj = ga_block * v + gc * static_cast<A>(u[start + j]);
      } else {
        gj = ga_block * v + gc;
      }
      return gj * cap_derivative<kCap>(zj, inv_cap);
    });
  }
}

template <Values kValues, bool kCap, typename T, typename A>
NCFAST_INLINE void write_gradient_for(bool column_weights, T* g, const T* z, const A* e, const A* block_ref,
                                      const double* u, int64_t K, int64_t y_local, A grad_target, A max, A ga, A gc,
                                      A cap, A inv_cap) {
  if (column_weights) {
    write_gradient<kValues, kCap, true>(g, z, e, block_ref, u, K, y_local, grad_target, max, ga, gc, cap, inv_cap);
  } else {
    write_gradient<kValues, kCap, false>(g, z, e, block_ref, u, K, y_local, grad_target, max, ga, gc, cap, inv_cap);
  }
}

// Where the elements of a (B, K, S) buffer lie: position i = b·S + s (a row of the loss) starts
// at b·outer + s·inner and its classes are `classes` elements apart. (N, K) is S = 1.
struct Layout {
  int64_t outer, inner, classes;
  NCFAST_INLINE int64_t at(int64_t i, int64_t S) const {
    return S == 1 ? i * outer : (i / S) * outer + (i % S) * inner;
  }
};

template <typename T>
struct LossArgs {
  using A = typename acc_of<T>::type;
  const T* logits;
  Layout logits_layout;
  const int64_t* target;
  Layout target_layout;        // (B, S): classes unused
  const double* class_weight;  // (K_total,) or null
  const double* alpha;         // (K_total,) or null (focal only)
  T* grad;
  Layout grad_layout;
  A* row_loss;  // (B·S,) or null
  A* row_lse;   // (B·S,) or null
  A* stats;     // (N, kStatsFields): written by loss_row_stats, read by loss_from_stats
  int64_t num_rows;  // positions B·S
  int64_t inner;     // S
  Slice slice;
  int64_t ignore_index;
  double total_class_weight;  // W = Σ_j w_j over all classes
  double grad_scale;          // 1/Σ_i w_{y_i} for reduction="mean", else 1
  LossOptions opt;
};

enum class Phase { fused, stats, from_stats };

template <Phase kPhase, bool kCap, typename T>
NCFAST_INLINE void loss_rows_impl(const LossArgs<T>& args, int64_t begin, int64_t end,
                                  typename acc_of<T>::type* scratch) {
  using A = typename acc_of<T>::type;
  const LossOptions& opt = args.opt;
  const Slice& slice = args.slice;
  const int64_t K = slice.num_classes;
  const A cap = static_cast<A>(opt.softcap), inv_cap = kCap ? 1 / cap : A(0);
  // Per-column weights enter only through weighted label smoothing.
  const bool column_weights = args.class_weight && opt.kind == kCrossEntropy && opt.label_smoothing > 0;
  const double* u = args.class_weight ? args.class_weight + slice.offset : nullptr;
  for (int64_t i = begin; i < end; ++i) {
    const T* z = args.logits + args.logits_layout.at(i, args.inner);
    const int64_t y = args.target[args.target_layout.at(i, args.inner)];
    const int64_t y_local = y - slice.offset;
    const bool local_target = 0 <= y_local && y_local < K;
    A* stats = args.stats ? args.stats + i * kStatsFields : nullptr;
    if (y == args.ignore_index) {
      if constexpr (kPhase == Phase::stats) {
        for (int f = 0; f < kStatsFields; ++f) stats[f] = 0;
      } else {
        T* g = args.grad + args.grad_layout.at(i, args.inner);
        for (int64_t j = 0; j < K; ++j) g[j] = from_acc<T>(0);
        args.row_loss[i] = 0;
        if (args.row_lse) args.row_lse[i] = 0;
      }
      continue;
    }
    RowStats<A> s;
    A *e = nullptr, *block_ref = nullptr;
    if constexpr (kPhase == Phase::from_stats) {
      s = {stats[0], stats[1], stats[2], stats[3], stats[4]};
    } else {
      if constexpr (kPhase == Phase::fused) {
        e = scratch;  // exp(z - m_b), kept in cache for the gradient sweep
        block_ref = scratch ? scratch + K : nullptr;
      }
      s = column_weights ? row_stats<kCap, true>(z, y_local, slice, u, opt.kind, cap, inv_cap, e, block_ref)
                         : row_stats<kCap, false>(z, y_local, slice, u, opt.kind, cap, inv_cap, e, block_ref);
      if constexpr (kPhase == Phase::stats) {
        stats[0] = s.max;
        stats[1] = s.sumexp;
        stats[2] = s.target_logit;
        stats[3] = s.weighted_sum;
        stats[4] = s.has_nan;
        continue;
      }
    }
    if constexpr (kPhase != Phase::stats) {
      const A w_y = args.class_weight ? static_cast<A>(args.class_weight[y]) : A(1);
      const A alpha_y = args.alpha ? static_cast<A>(args.alpha[y]) : A(1);
      const A W = column_weights ? static_cast<A>(args.total_class_weight) : static_cast<A>(slice.total);
      const RowResult<A> r = row_result<A>(s, opt, w_y, alpha_y, W, slice.total);
      const A scale = static_cast<A>(args.grad_scale);
      T* g = args.grad + args.grad_layout.at(i, args.inner);
      const A ga = scale * r.a, gc = scale * r.c;
      // y_local outside [0, K): the target's column lives on another process.
      const A gy = local_target ? scale * r.grad_target * cap_derivative<kCap>(s.target_logit, inv_cap) : A(0);
      if (opt.kind == kRescaledMSE) {
        write_gradient_for<Values::logits, kCap>(column_weights, g, z, e, block_ref, u, K, y_local, gy, s.max, ga, gc, cap,
                                                 inv_cap);
      } else if (kPhase == Phase::fused) {
        write_gradient_for<Values::stored_exp, kCap>(column_weights, g, z, e, block_ref, u, K, y_local, gy, s.max, ga, gc, cap,
                                                     inv_cap);
      } else {
        write_gradient_for<Values::recomputed_exp, kCap>(column_weights, g, z, e, block_ref, u, K, y_local, gy, s.max, ga, gc,
                                                         cap, inv_cap);
      }
      args.row_loss[i] = r.loss;
      if (args.row_lse) args.row_lse[i] = r.lse;
    }
  }
}

template <Phase kPhase, typename T>
NCFAST_INLINE void loss_rows(const LossArgs<T>& args, int64_t begin, int64_t end, typename acc_of<T>::type* scratch) {
  if (args.opt.softcap > 0) {
    loss_rows_impl<kPhase, true>(args, begin, end, scratch);
  } else {
    loss_rows_impl<kPhase, false>(args, begin, end, scratch);
  }
}

// A tile of kTile positions at once, one per SIMD lane: rows too short to fill the vector units
// one at a time (up to tile_max_classes), and positions of a class-strided (B, K, S)
// layout, whose classes are S elements apart. The tile is read into a class-major block
// zt[k·kTile + p] (contiguous along p for a class-strided layout; a transposition in L1 for
// short rows), the statistics are computed along k for all lanes at once, row_result_of with
// the branch-free lane math, then the gradient, stored back in the caller's layout. Padding
// lanes of a partial tile repeat its first position and are never stored, so every position
// goes through the same vector code: the bits do not depend on where a thread's range starts.
// Where tiles pay, measured (fp32, one thread, kernel time per logit, tile vs one row at a
// time): cross-entropy K=2 12 vs 38 ns, K=10 2.2 vs 9.4, K=32 1.3 vs 2.5, K=64 1.36 vs 1.44,
// K=128 1.11 vs 0.94; the MSE, whose rows cost less, K=10 0.99 vs 2.6, K=32 0.92 vs 0.78.
// With the per-row math vectorised across the lanes (the class weight and alpha looked up
// before the lane loop), cross-entropy forward + backward at (320000, 100), 2 threads: fp32
// 15.7 vs 16.9 ms, bf16 14.0 vs 21.8, focal fp32 15.8 vs 19.9; at K=128 tiles lost (19.3 vs 17.5)
// until rows with contiguous classes went through registers 16 × 16 at a time on AVX-512
// (transpose.h; the element-wise transpositions were half the kernel's time at K=100). Kernel
// alone, 2 threads, an AMD Zen 4, before and after: cross-entropy (320000, 100) fp32 32.1 ->
// 20.4 ms, bf16 26.1 -> 17.1; (320000, 32) fp32 8.7 -> 4.8; (320000, 16) fp32 5.1 -> 3.7; and
// against rows, (160000, 128) bf16 15.9 -> 11.5 (fp32 even), hence tiles up to K=128. The way
// back for rows shorter than 16 too, one thread: (3200000, 10) fp32 0.87x the time, bf16 0.75x,
// (2000000, 8) 0.87x, (1000000, 2) even.
constexpr int kTile = 32;
inline int64_t tile_max_classes(int kind) { return kind == kRescaledMSE ? 16 : 128; }

// factor[p] = vector[y[p]] for a tile's targets (class 0 where y[p] = -1), 1 without a vector.
template <typename A>
NCFAST_INLINE void per_target_factor(const double* vector, const int32_t* y, A* factor) {
  if (vector) {
    for (int p = 0; p < kTile; ++p) factor[p] = static_cast<A>(vector[y[p] < 0 ? 0 : y[p]]);
  } else {
#pragma omp simd
    for (int p = 0; p < kTile; ++p) factor[p] = A(1);
  }
}

template <int kKind, bool kCap, bool kColumnWeights, typename T>
NCFAST_INLINE void loss_tiles_impl(const LossArgs<T>& args, int64_t first_tile, int64_t end_tile,
                                   typename acc_of<T>::type* scratch) {
  using A = typename acc_of<T>::type;
  constexpr int P = kTile;
  constexpr bool kSoftmax = kKind != kRescaledMSE;
  const LossOptions& opt = args.opt;
  const int64_t K = args.slice.num_classes, S = args.inner, positions = args.num_rows;
  const Layout &zl = args.logits_layout, &gl = args.grad_layout, &tl = args.target_layout;
  const A cap = static_cast<A>(opt.softcap), inv_cap = kCap ? 1 / cap : A(0);
  const A W = kColumnWeights ? static_cast<A>(args.total_class_weight) : static_cast<A>(args.slice.total);
  const A scale = static_cast<A>(args.grad_scale);
  const double* u = args.class_weight;
  A* zt = scratch;         // the (capped) logits
  A* out = scratch + K * P;  // exp(z - max), then the gradient
  for (int64_t tile = first_tile; tile < end_tile; ++tile) {
    const int64_t i0 = tile * P, n = std::min<int64_t>(P, positions - i0);
    // A full tile inside one b, contiguous along s: loads and stores are plain vector moves.
    const bool one_segment = S > 1 && i0 / S == (i0 + P - 1) / S;
    // A full tile of rows, or of positions within one b: position p lies p·stride from the first.
    const bool evenly_spaced = n == P && (S == 1 || one_segment);
    // The tile's targets: p·stride apart where the positions are consecutive in one b.
    alignas(64) int64_t loaded[P];
    const int64_t* tile_target = args.target + tl.at(i0, S);
    const int64_t target_stride = S == 1 ? tl.outer : tl.inner;
    if (evenly_spaced) {
#pragma omp simd
      for (int p = 0; p < P; ++p) loaded[p] = tile_target[p * target_stride];
    } else {
      for (int p = 0; p < P; ++p) loaded[p] = args.target[tl.at(i0 + (p < n ? p : 0), S)];
    }
    // As int32 (K < 2^31, checked at the entry), -1 where there is no loss (ignored, padding):
    // compared with k on as many lanes as the accumulators (int64 targets took two vectors).
    alignas(64) int32_t y[P];
    const int64_t ignore_index = args.ignore_index;
#pragma omp simd
    for (int p = 0; p < P; ++p) y[p] = p < n && loaded[p] != ignore_index ? static_cast<int32_t>(loaded[p]) : -1;
    if (evenly_spaced) {
      // Class by class across the tile's positions: zl.inner apart within one b, rows
      // zl.outer apart (a strided load; one position's classes at a time costs a loop per row).
      const T* z = args.logits + zl.at(i0, S);
      const int64_t position_stride = S == 1 ? zl.outer : zl.inner;
      // Rows with contiguous classes: 16 × 16 blocks through registers first.
      int64_t k0 = 0;
      if constexpr (!kCap && std::is_same_v<A, float>) {
        if (S == 1 && zl.classes == 1) k0 = rows_to_classes(z, position_stride, K, P, zt);
      }
      for (int64_t k = k0; k < K; ++k) {
        const T* zk = z + k * zl.classes;
#pragma omp simd
        for (int p = 0; p < P; ++p) zt[k * P + p] = load_logit<kCap>(zk[p * position_stride], cap, inv_cap);
      }
    } else {
      // Position by position, each read along its classes (one contiguous stretch for rows).
      for (int p = 0; p < P; ++p) {
        const T* z = args.logits + zl.at(i0 + (p < n ? p : 0), S);
        for (int64_t k = 0; k < K; ++k) zt[k * P + p] = load_logit<kCap>(z[k * zl.classes], cap, inv_cap);
      }
    }
    // Statistics along k, as row_stats computes them for one row.
    alignas(64) A max[P], sum[P], weighted_sum[P], has_nan[P], target_logit[P];
    for (int p = 0; p < P; ++p) {
      max[p] = kSoftmax ? -std::numeric_limits<A>::infinity() : A(0);
      sum[p] = weighted_sum[p] = has_nan[p] = 0;
      target_logit[p] = zt[(y[p] < 0 ? 0 : y[p]) * P + p];
    }
    for (int64_t k = 0; k < K; ++k) {
      const A uk = kColumnWeights ? static_cast<A>(u[k]) : A(1);
#pragma omp simd
      for (int p = 0; p < P; ++p) {
        const A z = zt[k * P + p];
        has_nan[p] = z != z ? A(1) : has_nan[p];
        if constexpr (kSoftmax) {
          max[p] = z > max[p] ? z : max[p];
          weighted_sum[p] += uk * z;
        } else {
          sum[p] += static_cast<int32_t>(k) == y[p] ? A(0) : z * z;
        }
      }
    }
    if constexpr (kSoftmax) {
      for (int64_t k = 0; k < K; ++k) {
#pragma omp simd
        for (int p = 0; p < P; ++p) {
          const A e = vexp(zt[k * P + p] - max[p]);
          out[k * P + p] = e;
          sum[p] += e;
        }
      }
    }
    // The per-class factors of the targets, looked up first: a float64 gather inside the loop
    // below keeps GCC 12 from vectorising it (the row math then runs one lane at a time).
    alignas(64) A w_y[P], alpha_y[P];
    per_target_factor(u, y, w_y);
    per_target_factor(args.alpha, y, alpha_y);
    alignas(64) A ga[P], gc[P], gy[P], loss[P], lse[P];
#pragma omp simd
    for (int p = 0; p < P; ++p) {
      const RowStats<A> st{max[p], sum[p], target_logit[p], weighted_sum[p], has_nan[p]};
      const RowResult<A> r = row_result_of<kKind, LaneMath>(st, opt, w_y[p], alpha_y[p], W, args.slice.total);
      const bool on = y[p] >= 0;
      ga[p] = on ? scale * r.a : A(0);
      gc[p] = on ? scale * r.c : A(0);
      gy[p] = on ? scale * r.grad_target * cap_derivative<kCap>(target_logit[p], inv_cap) : A(0);
      loss[p] = on ? r.loss : A(0);
      lse[p] = on ? r.lse : A(0);
    }
    for (int64_t k = 0; k < K; ++k) {
      const A uk = kColumnWeights ? static_cast<A>(u[k]) : A(1);
#pragma omp simd
      for (int p = 0; p < P; ++p) {
        const A z = zt[k * P + p], v = kSoftmax ? out[k * P + p] : z;
        const A g = (ga[p] * v + gc[p] * uk) * cap_derivative<kCap>(z, inv_cap);
        out[k * P + p] = y[p] < 0 ? A(0) : (static_cast<int32_t>(k) == y[p] ? gy[p] : g);
      }
    }
    // Stored with streaming stores where whole cache lines are written (write_lines).
    if (n == P && one_segment && gl.inner == 1) {
      T* g = args.grad + gl.at(i0, S);
      for (int64_t k = 0; k < K; ++k) {
        const A* line = out + k * P;
        write_lines<A>(g + k * gl.classes, P, -1, A(0), [&](int64_t p) { return line[p]; });
      }
    } else if (S == 1 && gl.classes == 1 && gl.outer == K) {
      // Rows one after another: the tile's gradient is one stretch of n·K elements, transposed
      // back to row-major order in L1 (zt is free by now) and streamed.
      int64_t k0 = 0;
      if constexpr (std::is_same_v<A, float>) k0 = classes_to_rows(out, P, K, zt);
      for (int64_t k = k0; k < K; ++k) {
        for (int p = 0; p < P; ++p) zt[p * K + k] = out[k * P + p];
      }
      write_lines<A>(args.grad + i0 * K, n * K, -1, A(0), [&](int64_t j) { return zt[j]; });
    } else {
      for (int p = 0; p < n; ++p) {
        T* g = args.grad + gl.at(i0 + p, S);
        for (int64_t k = 0; k < K; ++k) g[k * gl.classes] = from_acc<T>(out[k * P + p]);
      }
    }
    A* row_loss = args.row_loss + i0;
#pragma omp simd
    for (int p = 0; p < n; ++p) row_loss[p] = loss[p];
    if (A* row_lse = args.row_lse ? args.row_lse + i0 : nullptr) {
#pragma omp simd
      for (int p = 0; p < n; ++p) row_lse[p] = lse[p];
    }
  }
}

// The loss, softcap and per-column weights of a call as compile-time constants, for the vector
// paths (softcap and label-smoothing weights are cross-entropy options).
template <int kKindValue, bool kCapValue, bool kColumnWeightsValue>
struct LaneOptions {
  static constexpr int kKind = kKindValue;
  static constexpr bool kCap = kCapValue, kColumnWeights = kColumnWeightsValue;
};

// Calls body(LaneOptions<...>{}) with the options of args.opt.
template <typename T, typename Body>
NCFAST_INLINE void with_lane_options(const LossArgs<T>& args, Body&& body) {
  const LossOptions& opt = args.opt;
  if (opt.kind == kRescaledMSE) return body(LaneOptions<kRescaledMSE, false, false>{});
  if (opt.kind == kFocal) return body(LaneOptions<kFocal, false, false>{});
  const bool cap = opt.softcap > 0, column_weights = args.class_weight && opt.label_smoothing > 0;
  if (cap && column_weights) return body(LaneOptions<kCrossEntropy, true, true>{});
  if (cap) return body(LaneOptions<kCrossEntropy, true, false>{});
  if (column_weights) return body(LaneOptions<kCrossEntropy, false, true>{});
  body(LaneOptions<kCrossEntropy, false, false>{});
}

// Tiles [first_tile, end_tile).
template <typename T>
NCFAST_INLINE void loss_tiles(const LossArgs<T>& args, int64_t first_tile, int64_t end_tile,
                              typename acc_of<T>::type* scratch) {
  with_lane_options(args, [&](auto o) NCFAST_INLINE_LAMBDA {
    using O = decltype(o);
    loss_tiles_impl<O::kKind, O::kCap, O::kColumnWeights>(args, first_tile, end_tile, scratch);
  });
}

// Positions of a class-strided (B, K, S) layout with S > 1 (NCHW segmentation, (B, V, T)
// tokens), read in place: a block of `block` consecutive s of one b at a time, each class's run
// of the block (block·sizeof(T) contiguous bytes, 1-4 KiB at small K) read once from memory
// into a class-major scratch zt[k·block + p] in L2, while the next block's runs are prefetched
// into L2. The statistics, row_result_of with the branch-free lane math (on local copies of a
// tile of lanes: the form GCC vectorises for every loss) and the gradient then run along k over
// all positions of the block at once, on the vector units; each class's gradient run is stored
// as one stretch (streaming stores of whole cache lines). A partial block at the end of S
// repeats its first position in the padding lanes, which are never stored: every position goes
// through the same vector code, and the blocks depend only on (K, S), so the bits do not depend
// on the thread count. Kernel alone, fp32, one thread, against 32-position tiles: (8, 19, 256,
// 256) cross-entropy 1.7x, focal 2.5x, MSE 1.2x faster; (4, 150, 128, 128) 1.2x, 1.3x, 1.1x.
constexpr int64_t kMaxStridedBlock = 1024;
// The block's logits (zt) and exponentials stay in L2: K·block ≤ 48K accumulators, 384 KiB.
constexpr int64_t kStridedBlockLogits = 48 * 1024;

// The positions per block for K classes: a power of two in [kTile, kMaxStridedBlock].
inline int64_t strided_block(int64_t K) {
  int64_t block = kMaxStridedBlock;
  while (block > kTile && K * block > kStridedBlockLogits) block /= 2;
  return block;
}

// The scratch vectors of the strided path lie kScratchSkew accumulators more than a block
// apart where a block is a multiple of 4 KiB (1024 fp32): vectors 4 KiB apart make the core
// take each load for one of the store just before it (4K aliasing), the whole block long.
constexpr int64_t kScratchSkew = 16;

// The per-thread scratch of the strided path, in accumulators: zt and the exponentials
// (K vectors each), ten per-position vectors and the targets (int32, one accumulator each).
inline int64_t strided_scratch_size(int64_t K) { return (2 * K + 11) * (strided_block(K) + kScratchSkew); }

template <int kKind, bool kCap, bool kColumnWeights, typename T>
NCFAST_INLINE void loss_strided_impl(const LossArgs<T>& args, int64_t first_block, int64_t end_block,
                                     typename acc_of<T>::type* scratch) {
  using A = typename acc_of<T>::type;
  constexpr bool kSoftmax = kKind != kRescaledMSE;
  const LossOptions& opt = args.opt;
  const int64_t K = args.slice.num_classes, S = args.inner, P = strided_block(K);
  const int64_t blocks_per_b = (S + P - 1) / P;
  const Layout &zl = args.logits_layout, &gl = args.grad_layout, &tl = args.target_layout;
  const A cap = static_cast<A>(opt.softcap), inv_cap = kCap ? 1 / cap : A(0);
  const A W = kColumnWeights ? static_cast<A>(args.total_class_weight) : static_cast<A>(args.slice.total);
  const A scale = static_cast<A>(args.grad_scale);
  const double* u = args.class_weight;
  // From one scratch vector to the next: skewed where a block is a multiple of 4 KiB.
  const int64_t R = P * static_cast<int64_t>(sizeof(A)) % 4096 == 0 ? P + kScratchSkew : P;
  A* const zt = scratch;  // the (capped) logits, class-major: class k at zt + k·R
  A* const ez = zt + K * R;  // exp(z - max), the same way
  A* const max = ez + K * R;
  A *const sum = max + R, *const weighted_sum = sum + R, *const has_nan = weighted_sum + R;
  A *const target_logit = has_nan + R, *const ga = target_logit + R, *const gc = ga + R, *const gy = gc + R;
  A *const loss = gy + R, *const lse = loss + R;
  // The targets as int32 (K < 2^31 here): compared with k on as many lanes as the logits.
  int32_t* const y = reinterpret_cast<int32_t*>(lse + R);
  for (int64_t block = first_block; block < end_block; ++block) {
    const int64_t b = block / blocks_per_b, s0 = (block % blocks_per_b) * P, n = std::min(P, S - s0);
    const T* z = args.logits + b * zl.outer + s0 * zl.inner;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t target = args.target[b * tl.outer + (s0 + (p < n ? p : 0)) * tl.inner];
      const bool on = p < n && target != args.ignore_index;
      y[p] = on ? static_cast<int32_t>(target) : -1;  // -1: no gradient, no loss
    }
    // The memory sweep: each class's run into zt, with the statistics that need no max. A NaN
    // logit of a softmax loss shows up in its position's Σ exp (NaN), found once per position
    // after the exponentials; Σ_j z_j is summed only where label smoothing uses it.
    for (int64_t p = 0; p < P; ++p) {
      max[p] = kSoftmax ? -std::numeric_limits<A>::infinity() : A(0);
      sum[p] = weighted_sum[p] = has_nan[p] = 0;
    }
    // The next block's runs into L2 while this one computes (prefetches never fault), one line
    // per line of this block's logits swept: in the exponentials' sweep (softmax losses) or the
    // memory sweep (the MSE, which has no other). Issued as a burst per class run, they gained
    // nothing over no prefetch at all (0.94-1.05x its time); spread out, kernel alone, one thread:
    // (8, 19, 256, 256) cross-entropy bf16 0.86x, fp32 0.79x, MSE 0.65-0.82x; (4, 150, 128, 128)
    // 0.68-0.82x.
    const bool prefetch = block + 1 < end_block && zl.inner == 1;
    const char* next = prefetch ? reinterpret_cast<const char*>(args.logits + ((block + 1) / blocks_per_b) * zl.outer +
                                                                ((block + 1) % blocks_per_b) * P * zl.inner)
                                : nullptr;
    constexpr int64_t L = kLineElements<T>;
    auto prefetch_line = [&](int64_t k, int64_t p0) NCFAST_INLINE_LAMBDA {
      if (prefetch) _mm_prefetch(next + (k * zl.classes + p0) * static_cast<int64_t>(sizeof(T)), _MM_HINT_T1);
    };
    const bool contiguous = zl.inner == 1 && n == P, logit_sum = kSoftmax && opt.label_smoothing > 0;
    auto memory_sweep = [&](auto with_logit_sum) {
      for (int32_t k = 0; k < K; ++k) {
        const T* zk = z + k * zl.classes;
        A* ztk = zt + k * R;
        const A uk = kColumnWeights ? static_cast<A>(u[k]) : A(1);
        auto take = [&](int64_t p, A value) {
          ztk[p] = value;
          if constexpr (kSoftmax) {
            max[p] = value > max[p] ? value : max[p];
            if constexpr (decltype(with_logit_sum)::value) weighted_sum[p] += uk * value;
          } else {
            has_nan[p] = value != value ? A(1) : has_nan[p];
            sum[p] += k == y[p] ? A(0) : value * value;
          }
        };
        if (contiguous) {
          for (int64_t p0 = 0; p0 < P; p0 += L) {
            if constexpr (!kSoftmax) prefetch_line(k, p0);
#pragma omp simd
            for (int64_t p = p0; p < p0 + L; ++p) take(p, load_logit<kCap>(zk[p], cap, inv_cap));
          }
        } else {
          for (int64_t p = 0; p < P; ++p) take(p, p < n ? load_logit<kCap>(zk[p * zl.inner], cap, inv_cap) : ztk[0]);
        }
      }
    };
    if (logit_sum) {
      memory_sweep(std::true_type{});
    } else {
      memory_sweep(std::false_type{});
    }
    for (int64_t p = 0; p < P; ++p) target_logit[p] = zt[(y[p] < 0 ? 0 : y[p]) * R + p];
    if constexpr (kSoftmax) {
      for (int64_t k = 0; k < K; ++k) {
        const A* ztk = zt + k * R;
        A* ezk = ez + k * R;
        for (int64_t p0 = 0; p0 < P; p0 += L) {
          prefetch_line(k, p0);
#pragma omp simd
          for (int64_t p = p0; p < p0 + L; ++p) {
            const A e = vexp(ztk[p] - max[p]);
            ezk[p] = e;
            sum[p] += e;
          }
        }
      }
      for (int64_t p = 0; p < P; ++p) has_nan[p] = sum[p] != sum[p] ? A(1) : A(0);
    }
    // A tile of lanes at a time, on local copies: the form the vectoriser takes (on the scratch
    // vectors themselves it does not, for cross-entropy).
    for (int64_t p0 = 0; p0 < P; p0 += kTile) {
      alignas(64) A st_max[kTile], st_sum[kTile], st_target[kTile], st_weighted[kTile], st_nan[kTile];
      alignas(64) A w_y[kTile], alpha_y[kTile];
      for (int q = 0; q < kTile; ++q) {
        const int32_t yq = y[p0 + q] < 0 ? 0 : y[p0 + q];
        w_y[q] = u ? static_cast<A>(u[yq]) : A(1);
        alpha_y[q] = args.alpha ? static_cast<A>(args.alpha[yq]) : A(1);
        st_max[q] = max[p0 + q], st_sum[q] = sum[p0 + q], st_target[q] = target_logit[p0 + q];
        st_weighted[q] = weighted_sum[p0 + q], st_nan[q] = has_nan[p0 + q];
      }
      alignas(64) A rga[kTile], rgc[kTile], rgy[kTile], rloss[kTile], rlse[kTile];
#pragma omp simd
      for (int q = 0; q < kTile; ++q) {
        const RowStats<A> st{st_max[q], st_sum[q], st_target[q], st_weighted[q], st_nan[q]};
        const RowResult<A> r = row_result_of<kKind, LaneMath>(st, opt, w_y[q], alpha_y[q], W, args.slice.total);
        rga[q] = scale * r.a;
        rgc[q] = scale * r.c;
        rgy[q] = scale * r.grad_target * cap_derivative<kCap>(st_target[q], inv_cap);
        rloss[q] = r.loss;
        rlse[q] = r.lse;
      }
      for (int q = 0; q < kTile; ++q) {
        const bool on = y[p0 + q] >= 0;
        ga[p0 + q] = on ? rga[q] : A(0);
        gc[p0 + q] = on ? rgc[q] : A(0);
        gy[p0 + q] = on ? rgy[q] : A(0);
        loss[p0 + q] = on ? rloss[q] : A(0);
        lse[p0 + q] = on ? rlse[q] : A(0);
      }
    }
    // g = (a·v + c·u_k)·cap'(z), g_y = grad_target, 0 at ignored positions; one run per class.
    T* g = args.grad + b * gl.outer + s0 * gl.inner;
    for (int32_t k = 0; k < K; ++k) {
      const A *ztk = zt + k * R, *vk = kSoftmax ? ez + k * R : ztk;
      const A uk = kColumnWeights ? static_cast<A>(u[k]) : A(1);
      auto value = [&](int64_t p) {
        const A gk = (ga[p] * vk[p] + gc[p] * uk) * cap_derivative<kCap>(ztk[p], inv_cap);
        return y[p] < 0 ? A(0) : (k == y[p] ? gy[p] : gk);
      };
      T* gk = g + k * gl.classes;
      if (gl.inner == 1) {
        write_lines<A>(gk, n, -1, A(0), value);
      } else {
        for (int64_t p = 0; p < n; ++p) gk[p * gl.inner] = from_acc<T>(value(p));
      }
    }
    for (int64_t p = 0; p < n; ++p) {
      args.row_loss[b * S + s0 + p] = loss[p];
      if (args.row_lse) args.row_lse[b * S + s0 + p] = lse[p];
    }
  }
}

// Blocks [first_block, end_block).
template <typename T>
NCFAST_INLINE void loss_strided(const LossArgs<T>& args, int64_t first_block, int64_t end_block,
                                typename acc_of<T>::type* scratch) {
  with_lane_options(args, [&](auto o) NCFAST_INLINE_LAMBDA {
    using O = decltype(o);
    loss_strided_impl<O::kKind, O::kCap, O::kColumnWeights>(args, first_block, end_block, scratch);
  });
}

// One clone set per element type and phase (target_clones does not apply to templates).
template <typename T>
using RowsFn = void (*)(const LossArgs<T>&, int64_t, int64_t, typename acc_of<T>::type*);

template <typename T>
struct RowsFns {
  RowsFn<T> fused, stats, from_stats, tiles, strided;
};
template <typename T>
RowsFns<T> rows_fns();

// The three phases' clone sets for element type T (accumulating in A), and their table.
#define NCFAST_LOSS_ROWS(SUFFIX, T, A)                                                            \
  NCFAST_CLONES void fused_##SUFFIX(const LossArgs<T>& args, int64_t begin, int64_t end, A* s) {      \
    loss_rows<Phase::fused>(args, begin, end, s);                                                 \
  }                                                                                               \
  NCFAST_CLONES void stats_##SUFFIX(const LossArgs<T>& args, int64_t begin, int64_t end, A* s) {      \
    loss_rows<Phase::stats>(args, begin, end, s);                                                 \
  }                                                                                               \
  NCFAST_CLONES void from_stats_##SUFFIX(const LossArgs<T>& args, int64_t begin, int64_t end, A* s) { \
    loss_rows<Phase::from_stats>(args, begin, end, s);                                            \
  }                                                                                               \
  NCFAST_CLONES void tiles_##SUFFIX(const LossArgs<T>& args, int64_t begin, int64_t end, A* s) {      \
    loss_tiles(args, begin, end, s);                                                              \
  }                                                                                               \
  NCFAST_CLONES void strided_##SUFFIX(const LossArgs<T>& args, int64_t begin, int64_t end, A* s) {    \
    loss_strided(args, begin, end, s);                                                            \
  }                                                                                               \
  template <>                                                                                     \
  RowsFns<T> rows_fns<T>() {                                                                      \
    return {fused_##SUFFIX, stats_##SUFFIX, from_stats_##SUFFIX, tiles_##SUFFIX, strided_##SUFFIX}; \
  }
NCFAST_LOSS_ROWS(f32, float, float)
NCFAST_LOSS_ROWS(f64, double, double)
NCFAST_LOSS_ROWS(bf16, bf16, float)
NCFAST_LOSS_ROWS(f16, f16, float)
#undef NCFAST_LOSS_ROWS

// What a stretch of targets holds: the positions not ignored, those out of range, and Σ w_y.
struct TargetCount {
  int64_t counted = 0, bad = 0;
  double weight = 0;
};

// Adds `length` targets, y(s) for s in [0, length), to `c`: counted branch-free (vectorised),
// Σ w_y in eight interleaved partial sums (as sum_rows; not one chain of dependent adds), skipped
// where a target is out of range (w_y would be read out of bounds).
template <typename Target>
NCFAST_INLINE void count_stretch(Target&& y, int64_t length, int64_t total, int64_t ignore_index,
                                 const double* class_weight, TargetCount& c) {
  int64_t counted = 0, bad = 0;
#pragma omp simd reduction(+ : counted, bad)
  for (int64_t s = 0; s < length; ++s) {
    const int64_t value = y(s);
    const bool ignored = value == ignore_index;
    counted += !ignored;
    bad += !ignored && (value < 0 || value >= total);
  }
  c.counted += counted;
  c.bad += bad;
  if (class_weight && bad == 0) {
    double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t s = 0; s < length; ++s) {
      const int64_t value = y(s);
      lanes[s % 8] += value != ignore_index ? class_weight[value] : 0.0;
    }
    c.weight += ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  }
}

// Positions per chunk of the target check: chunks, not threads, fix the order of Σ w_y.
constexpr int64_t kTargetChunk = 32768;

// counts[c] for the chunks c in [first_chunk, end_chunk) of n positions (b-major, S per b),
// each one stretch of consecutive s of one b at a time (no division per position).
NCFAST_CLONES void count_target_chunks(const int64_t* target, const Layout& layout, int64_t n, int64_t S,
                                       int64_t total, int64_t ignore_index, const double* class_weight,
                                       int64_t first_chunk, int64_t end_chunk, TargetCount* counts) {
  // (N,) targets are one b of N positions `outer` apart.
  const int64_t run_stride = S == 1 ? 0 : layout.outer, stride = S == 1 ? layout.outer : layout.inner;
  const int64_t per_b = S == 1 ? n : S;
  for (int64_t chunk = first_chunk; chunk < end_chunk; ++chunk) {
    TargetCount c;
    for (int64_t i = chunk * kTargetChunk, end = std::min(n, i + kTargetChunk); i < end;) {
      const int64_t b = i / per_b, s0 = i % per_b, length = std::min(end - i, per_b - s0);
      const int64_t* run = target + b * run_stride + s0 * stride;
      if (stride == 1) {
        count_stretch([run](int64_t s) NCFAST_INLINE_LAMBDA { return run[s]; }, length, total, ignore_index,
                      class_weight, c);
      } else {
        count_stretch([run, stride](int64_t s) NCFAST_INLINE_LAMBDA { return run[s * stride]; }, length, total,
                      ignore_index, class_weight, c);
      }
      i += length;
    }
    counts[chunk] = c;
  }
}

// Checks every target against [0, total) (out-of-range values are reported, never read
// through) and returns Σ_i w_{y_i} over the positions that are not ignored (without class
// weights, their count). Chunks of positions are counted in parallel and combined in order:
// the same bits for every thread count. The first bad value is searched for only when there is one.
double check_targets(const int64_t* target, const Layout& layout, int64_t n, int64_t S, int64_t total,
                     int64_t ignore_index, const double* class_weight, int num_threads) {
  if (n == 0) return 0;  // also S = 0, which has no runs to divide into
  const int64_t chunks = (n + kTargetChunk - 1) / kTargetChunk;
  std::vector<TargetCount> counts(chunks);
  const int threads = static_cast<int>(std::min<int64_t>(thread_count(num_threads), chunks));
  parallel_ranges(chunks, threads, [&](int64_t begin, int64_t end) {
    count_target_chunks(target, layout, n, S, total, ignore_index, class_weight, begin, end, counts.data());
  });
  double sum = 0;
  int64_t counted = 0;
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const TargetCount& c = counts[chunk];
    if (c.bad) {
      for (int64_t i = chunk * kTargetChunk; i < n; ++i) {
        const int64_t y = target[layout.at(i, S)];
        if (y != ignore_index && (y < 0 || y >= total)) {
          throw py::value_error("target: value " + std::to_string(y) + " at index " + std::to_string(i) +
                                " is out of range [0, " + std::to_string(total) + ") and is not ignore_index=" +
                                std::to_string(ignore_index));
        }
      }
    }
    sum += c.weight;
    counted += c.counted;
  }
  return class_weight ? sum : static_cast<double>(counted);
}

const double* optional_vector(const py::object& obj, const char* name, int64_t size) {
  if (obj.is_none()) return nullptr;
  View v = view_of(obj.cast<py::buffer>(), name, 1, sizeof(double), false);
  if (v.rows != size || (v.row_stride != 1 && size > 1)) {
    throw py::value_error(std::string(name) + ": expected a contiguous float64 vector of length " +
                          std::to_string(size));
  }
  return static_cast<const double*>(v.data);
}

size_t itemsize_of(const std::string& dtype) {
  if (dtype == "float64") return 8;
  if (dtype == "float32") return 4;
  if (dtype == "bfloat16" || dtype == "float16") return 2;
  throw py::type_error("logits: unsupported dtype " + dtype);
}

// Runs `fn` over `items` work items (rows, tiles of kTile positions or blocks of a class-strided
// layout), split evenly over the threads (each position's result is independent of the split, so
// any thread count gives the same bits). The threads' scratch (`scratch_size` accumulators each,
// 64-byte aligned) is allocated here, before the parallel region: a failed allocation raises
// MemoryError instead of aborting.
template <typename T>
void run_rows(const LossArgs<T>& args, RowsFn<T> fn, int64_t items, int64_t scratch_size, int num_threads) {
  using A = typename acc_of<T>::type;
  const int64_t N = args.num_rows, K = args.slice.num_classes;
  if (N == 0 || K == 0) return;
  // Below ~64K logits a thread costs more than it saves.
  const int64_t work_threads = std::max<int64_t>(1, (N * K) / 65536);
  const int threads = static_cast<int>(std::min<int64_t>({thread_count(num_threads), work_threads, items}));
  constexpr int64_t kLine = 64 / sizeof(A);
  const int64_t stride = (scratch_size + kLine - 1) / kLine * kLine;
  std::unique_ptr<A[]> scratch(scratch_size > 0 ? new A[stride * threads + kLine] : nullptr);
  A* aligned = scratch.get();
  if (aligned) aligned += (kLine - reinterpret_cast<uintptr_t>(aligned) / sizeof(A) % kLine) % kLine;
  parallel_ranges(items, threads, [&](int64_t begin, int64_t end) {
    fn(args, begin, end, aligned ? aligned + stride * thread_index() : nullptr);
    _mm_sfence();  // the streaming stores are visible before the caller reads the gradient
  });
}

// The arguments every entry point shares, checked and turned into LossArgs.
struct Call {
  const std::string& dtype;
  int kind;
  double label_smoothing, gamma, kappa, beta, z_loss, softcap;
  int64_t ignore_index;
  int64_t vocab_start, total_classes;  // total_classes < 0: all classes are here
};

// A (B, K, S) buffer as the kernels see it: (N, K) buffers are B = N, S = 1.
struct Blocks {
  void* data;
  int64_t B, K, S;
  Layout layout;
};

// An (N, K) buffer with contiguous rows as (N, K, 1) blocks.
Blocks blocks_of(const py::buffer& buffer, const char* name, size_t itemsize, bool writable) {
  View v = view_of(buffer, name, 2, itemsize, writable);
  return {v.data, v.rows, v.cols, 1, {v.row_stride, 0, 1}};
}

// (N,) targets as (N, 1) blocks.
Blocks targets_of(const py::buffer& buffer) {
  View v = view_of(buffer, "target", 1, sizeof(int64_t), false);
  return {v.data, v.rows, 1, 1, {v.row_stride, 0, 0}};
}

// The tensors of one call as addresses and (B, K, S) layouts, resolved at the entry point:
// from buffers (checked there) or from the addresses the Python layer passes for its own tensors.
struct Buffers {
  Blocks logits, target, grad;  // grad.data null: no gradient (the statistics phase)
  const double* class_weight;   // (total_classes,) or null
  const double* alpha;          // (total_classes,) or null
  void* row_loss;               // (B·S,) of the accumulation type
  void* row_lse;                // (B·S,) or null
  void* stats;                  // (B·S, kStatsFields) or null
  void* reduced;                // one element of the logits' type, or null
};

template <typename T>
LossArgs<T> make_args(const Call& call, const Buffers& buffers) {
  const Blocks& logits = buffers.logits;
  const Blocks& target = buffers.target;
  LossArgs<T> args{};
  if (call.kind < kCrossEntropy || call.kind > kRescaledMSE) throw py::value_error("kind: unknown loss");
  args.logits = static_cast<const T*>(logits.data);
  args.logits_layout = logits.layout;
  args.target = static_cast<const int64_t*>(target.data);
  args.target_layout = target.layout;
  args.num_rows = logits.B * logits.S;
  args.inner = logits.S;
  const int64_t total = call.total_classes < 0 ? logits.K : call.total_classes;
  if (call.vocab_start < 0 || call.vocab_start + logits.K > total)
    throw py::value_error("vocab_start: the slice [vocab_start, vocab_start + K) must lie in [0, total_classes)");
  args.slice = {logits.K, call.vocab_start, total};
  args.class_weight = buffers.class_weight;
  args.alpha = buffers.alpha;
  args.ignore_index = call.ignore_index;
  args.opt = {call.kind, call.label_smoothing, call.gamma, call.kappa, call.beta, call.z_loss, call.softcap};
  args.total_class_weight = 0;
  if (args.class_weight)
    for (int64_t k = 0; k < total; ++k) args.total_class_weight += args.class_weight[k];
  if (target.B != logits.B || target.S != logits.S)
    throw py::value_error("target: shape differs from the logits' (B, S) positions");
  return args;
}

void* output_vector(const py::object& obj, const char* name, int64_t n, size_t itemsize) {
  if (obj.is_none()) return nullptr;
  View v = view_of(obj.cast<py::buffer>(), name, 1, itemsize, true);
  if (v.rows != n || (v.row_stride != 1 && n > 1))
    throw py::value_error(std::string(name) + ": expected a contiguous vector with one entry per position");
  return v.data;
}

enum class Entry { forward, stats, from_stats };

// The vocabulary-parallel phases' buffers: (N, K) logits, (N,) targets, (N, 5) statistics,
// (N, K) gradient and (N,) outputs (the second phase only), each checked here.
Buffers checked_buffers(Entry entry, const Call& call, const py::buffer& logits_obj, const py::buffer& target_obj,
                        const py::object& stats_obj, const py::object& grad_obj, const py::object& row_loss_obj,
                        const py::object& row_lse_obj, const py::object& class_weight, const py::object& alpha) {
  const size_t itemsize = itemsize_of(call.dtype), acc_size = call.dtype == "float64" ? 8 : 4;
  Buffers b{};
  b.logits = blocks_of(logits_obj, "logits", itemsize, false);
  b.target = targets_of(target_obj);
  const int64_t N = b.logits.B, total = call.total_classes < 0 ? b.logits.K : call.total_classes;
  b.class_weight = optional_vector(class_weight, "weight", total);
  b.alpha = optional_vector(alpha, "alpha", total);
  View stats = view_of(stats_obj.cast<py::buffer>(), "stats", 2, acc_size, entry == Entry::stats);
  if (stats.rows != N || stats.cols != kStatsFields || (stats.row_stride != kStatsFields && N > 1))
    throw py::value_error("stats: expected a contiguous (N, 5) buffer");
  b.stats = stats.data;
  if (entry == Entry::from_stats) {
    b.grad = blocks_of(grad_obj.cast<py::buffer>(), "grad", itemsize, true);
    b.row_loss = output_vector(row_loss_obj, "row_loss", N, acc_size);
    b.row_lse = output_vector(row_lse_obj, "row_lse", N, acc_size);
  }
  return b;
}

// A tensor of the Python layer, passed as its address and (B, K, S) sizes and strides in elements.
Blocks blocks_at(uintptr_t address, int64_t B, int64_t K, int64_t S, int64_t outer, int64_t classes, int64_t inner) {
  return {reinterpret_cast<void*>(address), B, K, S, {outer, inner, classes}};
}

// Σ_i row_loss[i] in double, in a fixed order (eight interleaved partial sums, then the tail):
// the same bits for every thread count, and the reduced loss needs no tensor op after the call.
template <typename A>
double sum_rows(const A* row_loss, int64_t n) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int q = 0; q < 8; ++q) lanes[q] += row_loss[i + q];
  double sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < n; ++i) sum += row_loss[i];
  return sum;
}

// A fresh buffer of kHugePageMinBytes or more is a mapping of its own (glibc maps blocks of
// 32 MiB and more apart and unmaps them when freed), whose pages the kernel's stores fault in
// 4 KiB at a time: for a gradient at short rows that costs more than the loss itself (a 128 MB
// copy into a fresh buffer took 40 ms, into a huge-page one 13 ms, on a 2-core KVM guest). The
// Python side asks, where it allocates a gradient, for transparent huge pages where the system
// grants them on request (THP "madvise" mode), as torch does for its own allocations with
// THP_MEM_ALLOC_ENABLE=1; only the 2 MiB pages wholly inside it, and a refusal changes nothing.
constexpr int64_t kHugePageMinBytes = int64_t(32) << 20;
void advise_huge_pages(void* data, int64_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHugePage - 1);
  if (bytes >= kHugePageMinBytes && end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data, (void)bytes;
#endif
}

template <typename T>
double run_entry(Entry entry, const Call& call, const Buffers& buffers, bool mean, double total_weight,
                 int num_threads) {
  using A = typename acc_of<T>::type;
  LossArgs<T> args = make_args<T>(call, buffers);
  const int64_t N = args.num_rows, K = buffers.logits.K;
  args.stats = static_cast<A*>(buffers.stats);
  if (entry != Entry::stats) {
    const Blocks& grad = buffers.grad;
    if (grad.B != buffers.logits.B || grad.K != K || grad.S != buffers.logits.S)
      throw py::value_error("grad: shape differs from logits");
    args.grad = static_cast<T*>(grad.data);
    args.grad_layout = grad.layout;
    args.row_loss = static_cast<A*>(buffers.row_loss);
    if (!args.row_loss && N > 0) throw py::value_error("row_loss: required");
    args.row_lse = static_cast<A*>(buffers.row_lse);
  }
  T* reduced = static_cast<T*>(buffers.reduced);

  py::gil_scoped_release release;
  // Every entry reads class_weight[y] and alpha[y]: all targets are checked first.
  const double counted_weight = check_targets(args.target, args.target_layout, N, args.inner, args.slice.total,
                                              args.ignore_index, args.class_weight, num_threads);
  if (entry == Entry::forward) total_weight = counted_weight;
  args.grad_scale = mean ? 1.0 / total_weight : 1.0;
  const RowsFns<T> fns = rows_fns<T>();
  if (entry == Entry::forward) {
    // Rows with contiguous classes go one at a time when they are long enough to fill the
    // vector units, short rows a tile of rows at a time; class-strided (B, K, S) layouts a block
    // of positions along s at a time.
    const bool rows = (args.logits_layout.classes == 1 && args.grad_layout.classes == 1) || K == 1;
    // The vector paths compare int32 targets with k.
    if ((!rows || K <= tile_max_classes(call.kind)) && K > std::numeric_limits<int32_t>::max())
      throw py::value_error("logits: more than 2^31 - 1 classes in a layout whose classes are not contiguous");
    if (!rows && args.inner > 1) {
      const int64_t blocks = buffers.logits.B * ((args.inner + strided_block(K) - 1) / strided_block(K));
      run_rows<T>(args, fns.strided, blocks, strided_scratch_size(K), num_threads);
    } else if (!rows || K <= tile_max_classes(call.kind)) {
      run_rows<T>(args, fns.tiles, (N + kTile - 1) / kTile, 2 * K * kTile, num_threads);
    } else {
      // exp(z - max) lives in a per-thread scratch row (cache-resident), not in the gradient
      // buffer, so that the gradient is written exactly once.
      const int64_t scratch = call.kind != kRescaledMSE ? K + (K + kRowBlock - 1) / kRowBlock : 0;
      run_rows<T>(args, fns.fused, N, scratch, num_threads);
    }
    if (reduced) {
      const double sum = sum_rows(args.row_loss, N);
      *reduced = from_acc<T>(static_cast<A>(mean ? sum / total_weight : sum));
    }
  } else {
    run_rows<T>(args, entry == Entry::stats ? fns.stats : fns.from_stats, N, 0, num_threads);
  }
  return total_weight;
}

double dispatch(Entry entry, const Call& call, const Buffers& buffers, bool mean, double total_weight,
                int num_threads) {
  if (call.dtype == "float32")
    return run_entry<float>(entry, call, buffers, mean, total_weight, num_threads);
  if (call.dtype == "float64")
    return run_entry<double>(entry, call, buffers, mean, total_weight, num_threads);
  if (call.dtype == "bfloat16")
    return run_entry<bf16>(entry, call, buffers, mean, total_weight, num_threads);
  if (call.dtype == "float16")
    return run_entry<f16>(entry, call, buffers, mean, total_weight, num_threads);
  throw py::type_error("logits: unsupported dtype " + call.dtype);
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy against probability targets q (mixup, distillation), as torch defines it:
// ℓ_i = −Σ_j w_j q'_ij log p_ij with q' = (1−α) q + α/K, whose gradient is
// g_ij = (Σ_k w_k q'_ik) p_ij − w_j q'_ij. Three sweeps of a cache-resident row: the max and the
// two target sums, Σ exp(z − max), then the gradient.
template <bool kCap, typename T>
void soft_rows(const T* logits, int64_t logits_stride, const T* target, int64_t target_stride, T* grad,
               int64_t grad_stride, typename acc_of<T>::type* row_loss, typename acc_of<T>::type* row_lse,
               int64_t begin, int64_t end, int64_t K, const double* class_weight, double label_smoothing,
               double softcap, double grad_scale) {
  using A = typename acc_of<T>::type;
  const A cap = static_cast<A>(softcap), inv_cap = kCap ? static_cast<A>(1.0 / softcap) : A(0);
  const A keep = static_cast<A>(1.0 - label_smoothing), uniform = static_cast<A>(label_smoothing / K);
  const A nan = std::numeric_limits<A>::quiet_NaN();
  for (int64_t i = begin; i < end; ++i) {
    const T* z = logits + i * logits_stride;
    const T* q = target + i * target_stride;
    T* g = grad + i * grad_stride;
    A max = -std::numeric_limits<A>::infinity(), weight_sum = 0, weighted_logits = 0;
    bool has_nan = false;
    for (int64_t j = 0; j < K; ++j) {
      const A zj = load_logit<kCap>(z[j], cap, inv_cap);
      const A wq = (keep * to_float(q[j]) + uniform) * (class_weight ? static_cast<A>(class_weight[j]) : A(1));
      has_nan |= zj != zj;
      max = std::max(max, zj);
      weight_sum += wq;
      weighted_logits += wq * zj;
    }
    A sumexp = 0;
    for (int64_t j = 0; j < K; ++j) sumexp += vexp(load_logit<kCap>(z[j], cap, inv_cap) - max);
    const A lse = max + std::log(sumexp);
    const bool bad = has_nan || max == std::numeric_limits<A>::infinity();
    row_loss[i] = bad ? nan : weight_sum * lse - weighted_logits;
    if (row_lse) row_lse[i] = bad ? nan : lse;
    const A a = static_cast<A>(grad_scale) * weight_sum / sumexp, scale = static_cast<A>(grad_scale);
    for (int64_t j = 0; j < K; ++j) {
      const A zj = load_logit<kCap>(z[j], cap, inv_cap);
      const A wq = (keep * to_float(q[j]) + uniform) * (class_weight ? static_cast<A>(class_weight[j]) : A(1));
      const A gj = (a * vexp(zj - max) - scale * wq) * cap_derivative<kCap>(zj, inv_cap);
      g[j] = from_acc<T>(bad ? nan : gj);
    }
  }
}

template <typename T>
void run_soft(const py::buffer& logits_obj, const py::buffer& target_obj, const py::buffer& grad_obj,
              const py::object& row_loss_obj, const py::object& row_lse_obj, const py::object& class_weight_obj,
              double label_smoothing, double softcap, double grad_scale, int num_threads) {
  using A = typename acc_of<T>::type;
  View logits = view_of(logits_obj, "logits", 2, sizeof(T), false);
  View target = view_of(target_obj, "target", 2, sizeof(T), false);
  View grad = view_of(grad_obj, "grad", 2, sizeof(T), true);
  const int64_t N = logits.rows, K = logits.cols;
  if (target.rows != N || target.cols != K) throw py::value_error("target: shape differs from logits");
  if (grad.rows != N || grad.cols != K) throw py::value_error("grad: shape differs from logits");
  A* row_loss = static_cast<A*>(output_vector(row_loss_obj, "row_loss", N, sizeof(A)));
  if (!row_loss) throw py::value_error("row_loss: required");
  A* row_lse = static_cast<A*>(output_vector(row_lse_obj, "row_lse", N, sizeof(A)));
  const double* class_weight = optional_vector(class_weight_obj, "weight", K);
  py::gil_scoped_release release;
  if (N == 0 || K == 0) return;
  const int threads = static_cast<int>(
      std::min<int64_t>({thread_count(num_threads), std::max<int64_t>(1, (N * K) / 65536), N}));
  parallel_ranges(N, threads, [&](int64_t begin, int64_t end) {
    auto rows = softcap > 0 ? soft_rows<true, T> : soft_rows<false, T>;
    rows(static_cast<const T*>(logits.data), logits.row_stride, static_cast<const T*>(target.data),
         target.row_stride, static_cast<T*>(grad.data), grad.row_stride, row_loss, row_lse, begin, end, K,
         class_weight, label_smoothing, softcap, grad_scale);
  });
}

}  // namespace

void register_losses(py::module_& m) {
  m.def(
      "loss_forward",
      [](uintptr_t logits, int64_t B, int64_t K, int64_t S, int64_t logits_outer, int64_t logits_classes,
         int64_t logits_inner, uintptr_t target, int64_t target_outer, int64_t target_inner, uintptr_t grad,
         int64_t grad_outer, int64_t grad_classes, int64_t grad_inner, uintptr_t row_loss, uintptr_t row_lse,
         uintptr_t reduced, const std::string& dtype, int kind, double label_smoothing, double gamma, double kappa,
         double beta, double z_loss, double softcap, uintptr_t class_weight, uintptr_t alpha, int64_t ignore_index,
         bool mean, int num_threads) {
        if (B < 0 || K < 0 || S < 0) throw py::value_error("logits: negative size");
        itemsize_of(dtype);
        Call call{dtype, kind, label_smoothing, gamma, kappa, beta, z_loss, softcap, ignore_index, 0, -1};
        Buffers buffers{};
        buffers.logits = blocks_at(logits, B, K, S, logits_outer, logits_classes, logits_inner);
        buffers.target = blocks_at(target, B, 1, S, target_outer, 0, target_inner);
        buffers.grad = blocks_at(grad, B, K, S, grad_outer, grad_classes, grad_inner);
        buffers.class_weight = reinterpret_cast<const double*>(class_weight);
        buffers.alpha = reinterpret_cast<const double*>(alpha);
        buffers.row_loss = reinterpret_cast<void*>(row_loss);
        buffers.row_lse = reinterpret_cast<void*>(row_lse);
        buffers.reduced = reinterpret_cast<void*>(reduced);
        return dispatch(Entry::forward, call, buffers, mean, 0.0, num_threads);
      },
      "Fused loss and gradient, on the Python layer's own tensors passed by address (0 for an "
      "absent one) with their (B, K, S) sizes and strides in elements ((N, K) is S = 1); the "
      "caller guarantees the shapes: logits and grad (B, K, S) of `dtype` (grad may be the logits "
      "buffer), target (B, S) int64, row_loss and row_lse (B·S,) fp32 (fp64 for fp64 logits), "
      "position b·S + s, receiving w_y·ℓ and lse; class_weight, alpha: (K,) float64; reduced: one "
      "element of `dtype` receiving Σ w_y·ℓ (divided by Σw when mean), summed in float64 in a "
      "fixed order. grad[b, :, s] is w_y·∂ℓ/∂z[b, :, s], divided by Σw when mean. Targets are "
      "checked (ValueError) before anything is read through them. Returns Σw over the counted "
      "positions.");
  m.def(
      "loss_row_stats",
      [](const py::buffer& logits, const py::buffer& target, const py::object& stats, const std::string& dtype,
         int kind, double label_smoothing, double softcap, const py::object& class_weight, int64_t ignore_index,
         int64_t vocab_start, int64_t total_classes, int num_threads) {
        Call call{dtype, kind, label_smoothing, 0.0, 1.0, 0.0, 0.0, softcap, ignore_index, vocab_start, total_classes};
        const Buffers buffers = checked_buffers(Entry::stats, call, logits, target, stats, py::none(), py::none(),
                                                py::none(), class_weight, py::none());
        dispatch(Entry::stats, call, buffers, false, 0.0, num_threads);
      },
      py::arg("logits"), py::arg("target"), py::arg("stats"), py::arg("dtype"), py::arg("kind"),
      py::arg("label_smoothing"), py::arg("softcap"), py::arg("class_weight"), py::arg("ignore_index"),
      py::arg("vocab_start"), py::arg("total_classes"), py::arg("num_threads"),
      "Vocabulary-parallel phase 1: per-row statistics (max, Σexp(z - max) or Σ_{j≠y} z², z_y, "
      "Σ_j w_j z_j, NaN flag) of this slice of the classes into stats (N, 5).");
  m.def(
      "loss_from_stats",
      [](const py::buffer& logits, const py::buffer& target, const py::buffer& stats, const py::object& grad,
         const py::object& row_loss, const py::object& row_lse, const std::string& dtype, int kind,
         double label_smoothing, double gamma, double kappa, double beta, double z_loss, double softcap,
         const py::object& class_weight, const py::object& alpha, int64_t ignore_index, int64_t vocab_start,
         int64_t total_classes, bool mean, double total_weight, int num_threads) {
        Call call{dtype, kind, label_smoothing, gamma, kappa, beta, z_loss, softcap, ignore_index, vocab_start,
                  total_classes};
        const Buffers buffers = checked_buffers(Entry::from_stats, call, logits, target, stats, grad, row_loss,
                                                row_lse, class_weight, alpha);
        dispatch(Entry::from_stats, call, buffers, mean, total_weight, num_threads);
      },
      py::arg("logits"), py::arg("target"), py::arg("stats"), py::arg("grad"), py::arg("row_loss"),
      py::arg("row_lse"), py::arg("dtype"), py::arg("kind"), py::arg("label_smoothing"), py::arg("gamma"),
      py::arg("kappa"), py::arg("beta"), py::arg("z_loss"), py::arg("softcap"), py::arg("class_weight"),
      py::arg("alpha"), py::arg("ignore_index"), py::arg("vocab_start"), py::arg("total_classes"),
      py::arg("mean"), py::arg("total_weight"), py::arg("num_threads"),
      "Vocabulary-parallel phase 2: loss and this slice's gradient from the statistics combined "
      "over all slices (stats as written by loss_row_stats, then reduced).");
  m.def(
      "soft_cross_entropy_forward",
      [](const py::buffer& logits, const py::buffer& target, const py::buffer& grad, const py::object& row_loss,
         const py::object& row_lse, const std::string& dtype, const py::object& class_weight, double label_smoothing,
         double softcap, double grad_scale, int num_threads) {
        if (dtype == "float32")
          return run_soft<float>(logits, target, grad, row_loss, row_lse, class_weight, label_smoothing, softcap,
                                 grad_scale, num_threads);
        if (dtype == "float64")
          return run_soft<double>(logits, target, grad, row_loss, row_lse, class_weight, label_smoothing, softcap,
                                  grad_scale, num_threads);
        if (dtype == "bfloat16")
          return run_soft<bf16>(logits, target, grad, row_loss, row_lse, class_weight, label_smoothing, softcap,
                                grad_scale, num_threads);
        if (dtype == "float16")
          return run_soft<f16>(logits, target, grad, row_loss, row_lse, class_weight, label_smoothing, softcap,
                               grad_scale, num_threads);
        throw py::type_error("logits: unsupported dtype " + dtype);
      },
      py::arg("logits"), py::arg("target"), py::arg("grad"), py::arg("row_loss"), py::arg("row_lse"),
      py::arg("dtype"), py::arg("class_weight"), py::arg("label_smoothing"), py::arg("softcap"),
      py::arg("grad_scale"), py::arg("num_threads"),
      "Cross-entropy against probability targets, fused with its gradient. logits, target (in the "
      "logits' dtype), grad: (N, K), rows contiguous; row_loss, row_lse (or None): (N,) fp32 (fp64 "
      "for fp64 logits) receive ℓ_i and lse_i; class_weight: (K,) float64 or None. Row i of grad is "
      "grad_scale·∂ℓ_i/∂z_i.");
  m.def(
      "advise_huge_pages",
      [](uintptr_t address, int64_t bytes) { advise_huge_pages(reinterpret_cast<void*>(address), bytes); },
      py::arg("address"), py::arg("bytes"),
      "Asks for transparent huge pages on the 2 MiB pages wholly inside a freshly allocated buffer "
      "(address, bytes) of HUGE_PAGE_MIN_BYTES or more, before anything is written to it; does "
      "nothing for a smaller one or where the system refuses.");
  m.attr("HUGE_PAGE_MIN_BYTES") = kHugePageMinBytes;
  m.attr("LOSS_KINDS") = py::make_tuple("cross_entropy", "focal", "rescaled_mse");
}

}  // namespace ncfast
