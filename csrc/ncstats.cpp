// The CPU kernels of the streaming neural-collapse statistics.
//
// ncstats_update: folds a batch into the float64 state, touching only the K' ≤ N classes the
// batch holds (its labels arrive compacted to [0, K')): their counts and means ν_k, and the
// rows centred on
//
//     p_k = ν_k − t_k (ν_k − μ_k),   t_k = √(n_k^a / (n_k^a + n_k^b)),
//
// where μ_k, n_k^a are the running mean and count. Then
//
//     Σ_{i∈k} (h_i − p_k)(h_i − p_k)ᵀ = M_k^batch + n_k^b t_k² δ_k δ_kᵀ
//                                    = M_k^batch + (n^a n^b / (n^a + n^b)) δ_k δ_kᵀ,
//
// with δ_k = ν_k − μ_k: the batch scatter plus Chan, Golub and LeVeque's pairwise correction,
// so one Gram CᵀC of the centred rows is the whole update of the within-class scatter and no
// correction rows are needed. The per-class Σ‖h_i − p_k‖² are, by the same identity, the
// whole update of Σ_{i∈k}‖h_i − μ_k‖² (for the CDNV).
//
// The rows are written times a power of two 2^-e (exact), e chosen from the batch's magnitude
// so that the float32 Gram neither overflows nor underflows whatever the features' size.
//
// The batch work is split by blocks of columns, not rows: each thread owns whole columns, so
// the per-class sums need no cross-thread reduction and are bit-identical for any thread
// count; each thread still streams through the rows in order. Rows are written in float32
// (float64 for float64 input).
//
// ncstats_pairwise_tile: one tile of the pairwise metrics (see the function).
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace ncfast {
namespace {

constexpr int64_t kColumnBlock = 64;

template <typename T, typename C>
struct BatchArgs {
  const T* features;
  int64_t features_stride;
  const int64_t* target;  // compacted labels in [0, K')
  int64_t target_stride;
  const int64_t* classes;      // (K',) the class of each compacted label
  const double* counts;        // (K',) batch counts n^b (all > 0)
  const double* shrink;        // (K',) t_k (second phase)
  const double* state_means;   // (K, d) running means μ (rows `classes` are read)
  double* means;               // (K', d) batch means ν_k, rows contiguous
  C* centred;                  // (N, d)
  int64_t centred_stride;
  double scale;                // power of two applied to the centred rows (second phase)
  double* block_max;           // (blocks,): max |h| over the block's columns (first phase)
  double* block_sq;            // (blocks, K'): block b's share of Σ_{i∈k} ‖h_i − p_k‖²
  int64_t rows, dim, batch_classes;
};

// Every pass walks the rows in order and, in each row, the thread's own column blocks
// [b0, b1): the batch streams through memory once per pass (a column strip per pass would
// touch every page of the batch once per block and thrash the TLB). Per-class squared
// distances are kept per 64-column block so that their sum does not depend on the split.

// First phase: class means ν_k and the largest |h| of the thread's columns.
template <typename T, typename C>
NCFAST_INLINE void means_blocks(const BatchArgs<T, C>& a, int64_t b0, int64_t b1) {
  const int64_t d = a.dim, K = a.batch_classes, c0 = b0 * kColumnBlock, c1 = std::min(b1 * kColumnBlock, d);
  for (int64_t k = 0; k < K; ++k) std::fill(a.means + k * d + c0, a.means + k * d + c1, 0.0);
  double largest = 0.0;
  for (int64_t i = 0; i < a.rows; ++i) {
    const T* x = a.features + i * a.features_stride;
    double* m = a.means + a.target[i * a.target_stride] * d;
#pragma omp simd reduction(max : largest)
    for (int64_t j = c0; j < c1; ++j) {
      const double v = static_cast<double>(to_float(x[j]));
      m[j] += v;
      largest = std::max(largest, std::fabs(v));
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    double* m = a.means + k * d;
    const double n = a.counts[k];
#pragma omp simd
    for (int64_t j = c0; j < c1; ++j) m[j] /= n;
  }
  for (int64_t b = b0; b < b1; ++b) a.block_max[b] = largest;
}

// Second phase: rows scale·(h_i − p_{y_i}) and their squared norms ‖h_i − p_{y_i}‖².
template <typename T, typename C>
NCFAST_INLINE void centre_blocks(const BatchArgs<T, C>& a, int64_t b0, int64_t b1) {
  const int64_t d = a.dim, K = a.batch_classes;
  for (int64_t b = b0; b < b1; ++b) std::fill(a.block_sq + b * K, a.block_sq + (b + 1) * K, 0.0);
  for (int64_t i = 0; i < a.rows; ++i) {
    const int64_t y = a.target[i * a.target_stride];
    const T* x = a.features + i * a.features_stride;
    const double* m = a.means + y * d;
    const double* mu = a.state_means + a.classes[y] * d;
    const double t = a.shrink[y], scale = a.scale;
    C* c = a.centred + i * a.centred_stride;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kColumnBlock, j1 = std::min(j0 + kColumnBlock, d);
      double row_sq = 0.0;
#pragma omp simd reduction(+ : row_sq)
      for (int64_t j = j0; j < j1; ++j) {
        const double v = static_cast<double>(to_float(x[j])) - (m[j] - t * (m[j] - mu[j]));
        c[j] = static_cast<C>(v * scale);
        row_sq += v * v;
      }
      a.block_sq[b * K + y] += row_sq;
    }
  }
}

// Non-template entry points: target_clones needs plain functions.
#define NCFAST_PHASES(T, C, NAME)                                                                              \
  NCFAST_CLONES void means_##NAME(const BatchArgs<T, C>& a, int64_t b, int64_t e) { means_blocks(a, b, e); } \
  NCFAST_CLONES void centre_##NAME(const BatchArgs<T, C>& a, int64_t b, int64_t e) { centre_blocks(a, b, e); }
NCFAST_PHASES(float, float, f32)
NCFAST_PHASES(double, double, f64)
NCFAST_PHASES(bf16, float, bf16)
NCFAST_PHASES(f16, float, f16)
#undef NCFAST_PHASES

template <typename T, typename C>
using Phase = void (*)(const BatchArgs<T, C>&, int64_t, int64_t);

// Checks a contiguous float64 buffer of the given shape.
double* state_of(const py::buffer& buffer, const char* name, int ndim, int64_t rows, int64_t cols, bool writable) {
  View v = view_of(buffer, name, ndim, sizeof(double), writable);
  const bool contiguous = ndim == 1 ? (v.row_stride == 1 || rows <= 1) : (v.row_stride == cols || rows <= 1);
  if (v.rows != rows || v.cols != cols || !contiguous) {
    throw py::value_error(std::string(name) + ": expected a contiguous float64 buffer of shape (" +
                          std::to_string(rows) + (ndim == 2 ? ", " + std::to_string(cols) : std::string(",")) + ")");
  }
  return static_cast<double*>(v.data);
}

struct State {
  double* counts;    // (K,)
  double* means;     // (K, d)
  double* class_sq;  // (K,)
  int64_t classes;   // K
};

// Both phases, the scale, the overflow check and Chan's fold of the batch's classes into the
// state; returns e, the centred rows being written times 2^-e. Throws ValueError, the state
// untouched, for a non-finite feature or a scatter beyond float64's range.
template <typename T, typename C>
int run_update(const View& features, const View& target, const int64_t* classes, int64_t batch_classes,
               const double* counts, double* means, const View& centred, const State& state, int num_threads,
               Phase<T, C> means_fn, Phase<T, C> centre_fn) {
  const int64_t d = features.cols, K = batch_classes;
  const int64_t blocks = (d + kColumnBlock - 1) / kColumnBlock;
  std::vector<double> block_sq(static_cast<size_t>(blocks * K)), block_max(static_cast<size_t>(blocks));
  std::vector<double> shrink(static_cast<size_t>(K));
  BatchArgs<T, C> a{static_cast<const T*>(features.data), features.row_stride,
                    static_cast<const int64_t*>(target.data), target.row_stride, classes, counts, shrink.data(),
                    state.means, means, static_cast<C*>(centred.data), centred.row_stride, 1.0, block_max.data(),
                    block_sq.data(), features.rows, d, K};
  py::gil_scoped_release release;
  // The passes are bound by memory traffic, which one core nearly saturates: a second thread
  // only pays off from ~4M values (16 MB of fp32) per thread, and on a busy machine a
  // parallel region waits for its slowest thread.
  const int64_t work_threads = std::max<int64_t>(1, (features.rows * d) >> 22);
  const int threads = static_cast<int>(std::min<int64_t>({thread_count(num_threads), work_threads, blocks}));
  parallel_ranges(blocks, threads, [&](int64_t begin, int64_t end) { means_fn(a, begin, end); });
  // A NaN or ±inf feature makes its class mean non-finite: K'·d values to check, not N·d.
  bool finite = true;
  for (int64_t i = 0; i < K * d; ++i) finite &= std::isfinite(means[i]);
  if (!finite) {
    py::gil_scoped_acquire acquire;
    throw py::value_error("features: contains NaN or infinite values");
  }
  // |h| and |μ| ≤ 2^e, so every centred row is below 2^(e+1): written times 2^-e, exactly,
  // its float32 Gram (≤ 4N per entry) neither overflows nor underflows. 2^-e stays a finite
  // float64 (e ≥ −1000) for float64 subnormal inputs.
  double largest = *std::max_element(block_max.begin(), block_max.end());
  for (int64_t k = 0; k < K; ++k) {
    const double* mu = state.means + classes[k] * d;
    for (int64_t j = 0; j < d; ++j) largest = std::max(largest, std::fabs(mu[j]));
    const double na = state.counts[classes[k]];
    shrink[k] = std::sqrt(na / (na + counts[k]));
  }
  int exponent = 0;
  if (largest > 0) std::frexp(largest, &exponent);
  exponent = std::max(exponent, -1000);
  a.scale = std::ldexp(1.0, -exponent);
  parallel_ranges(blocks, threads, [&](int64_t begin, int64_t end) { centre_fn(a, begin, end); });
  // Fixed block order: the same sum for any thread count. The scatter's entries are bounded
  // by its trace, Σ_k class_sq_k: below 2^1000 nothing can overflow.
  std::vector<double> class_sq(static_cast<size_t>(K));
  double trace = 0.0;
  for (int64_t k = 0; k < state.classes; ++k) trace += state.class_sq[k];
  for (int64_t k = 0; k < K; ++k) {
    double total = 0.0;
    for (int64_t b = 0; b < blocks; ++b) total += block_sq[b * K + k];
    class_sq[k] = total;
    trace += total;
  }
  if (!(trace < std::ldexp(1.0, 1000))) {
    py::gil_scoped_acquire acquire;
    throw py::value_error("features: their within-class scatter overflows float64 (values near 1e150 or beyond); "
                          "rescale the features");
  }
  for (int64_t k = 0; k < K; ++k) {  // Chan's fold: μ += (n^b/(n^a+n^b))(ν − μ)
    const int64_t c = classes[k];
    const double total = state.counts[c] + counts[k], fraction = counts[k] / total;
    double* mu = state.means + c * d;
    const double* nu = means + k * d;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) mu[j] += fraction * (nu[j] - mu[j]);
    state.counts[c] = total;
    state.class_sq[c] += class_sq[k];
  }
  return exponent;
}

// ncstats_update(features, target, dtype, classes, state_counts, state_means, state_class_sq,
//                means, centred, num_threads) -> e
// features: (N, d) rows contiguous, float32/float64/bfloat16 (as int16)/float16; target: (N,)
// int64 labels compacted to [0, K'), classes (K',) the class of each (distinct, in [0, K));
// the state (K,), (K, d), (K,) float64 is updated in place for those classes; means (K', d)
// is scratch. Writes 2^-e (h_i − p_{y_i}) (N, d) in float32 (float64 for float64 features):
// the caller adds 2^(2e) times their Gram to the within-class scatter.
int ncstats_update(const py::buffer& features_buf, const py::buffer& target_buf, const std::string& dtype,
                   const py::buffer& classes_buf, const py::buffer& state_counts_buf,
                   const py::buffer& state_means_buf, const py::buffer& state_class_sq_buf,
                   const py::buffer& means_buf, const py::buffer& centred_buf, int num_threads) {
  const size_t itemsize = dtype == "float64" ? 8 : dtype == "float32" ? 4 : (dtype == "bfloat16" || dtype == "float16") ? 2 : 0;
  if (itemsize == 0) throw py::type_error("features: unsupported dtype " + dtype);
  View features = view_of(features_buf, "features", 2, itemsize, false);
  View target = view_of(target_buf, "target", 1, sizeof(int64_t), false);
  View classes_view = view_of(classes_buf, "classes", 1, sizeof(int64_t), false);
  View state_view = view_of(state_counts_buf, "state_counts", 1, sizeof(double), true);
  View centred = view_of(centred_buf, "centred", 2, dtype == "float64" ? 8 : 4, true);
  const int64_t N = features.rows, d = features.cols, K = state_view.rows, batch_classes = classes_view.rows;
  State state{state_of(state_counts_buf, "state_counts", 1, K, 1, true),
              state_of(state_means_buf, "state_means", 2, K, d, true),
              state_of(state_class_sq_buf, "state_class_sq", 1, K, 1, true), K};
  double* means = state_of(means_buf, "means", 2, batch_classes, d, true);
  if (target.rows != N) throw py::value_error("target: length differs from features' rows");
  if (centred.rows != N || centred.cols != d) throw py::value_error("centred: expected shape (N, d)");
  if (classes_view.row_stride != 1 && batch_classes > 1) throw py::value_error("classes: expected a contiguous array");
  const int64_t* classes = static_cast<const int64_t*>(classes_view.data);
  for (int64_t k = 0; k < batch_classes; ++k) {
    if (classes[k] < 0 || classes[k] >= K) throw py::value_error("classes: value out of range [0, K)");
  }
  // Validate every label before any is used as an offset.
  std::vector<double> counts(static_cast<size_t>(batch_classes));
  const int64_t* y = static_cast<const int64_t*>(target.data);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t k = y[i * target.row_stride];
    if (k < 0 || k >= batch_classes) {
      throw py::value_error("target: compacted label " + std::to_string(k) + " at index " + std::to_string(i) +
                            " is out of range [0, " + std::to_string(batch_classes) + ")");
    }
    counts[k] += 1.0;
  }
  for (int64_t k = 0; k < batch_classes; ++k) {
    if (counts[k] == 0) throw py::value_error("target: compacted label " + std::to_string(k) + " has no row");
  }
  const double* n = counts.data();
  if (dtype == "float32")
    return run_update<float, float>(features, target, classes, batch_classes, n, means, centred, state, num_threads,
                                    means_f32, centre_f32);
  if (dtype == "float64")
    return run_update<double, double>(features, target, classes, batch_classes, n, means, centred, state,
                                      num_threads, means_f64, centre_f64);
  if (dtype == "bfloat16")
    return run_update<bf16, float>(features, target, classes, batch_classes, n, means, centred, state, num_threads,
                                   means_bf16, centre_bf16);
  return run_update<f16, float>(features, target, classes, batch_classes, n, means, centred, state, num_threads,
                                means_f16, centre_f16);
}

// One tile of the pairwise metrics over the rows k of one block and l of another:
// `cosines` (R, C) holds cos∠(u_k, u_l) = û_k·û_l of unit vectors; returns
//
//     Σ_kl |cos_kl + shift|                                   (max-angle, shift = 1/(K−1))
//     Σ_kl (cos_kl − mean)²                                   (equiangularity, mean cosine known)
//     Σ_kl (v_k + v_l) / (2 ‖u_k − u_l‖²)                     (CDNV, only when `variances`)
//
// with ‖u_k − u_l‖² = ‖u_k‖² + ‖u_l‖² − 2‖u_k‖‖u_l‖cos_kl, over every pair, or every pair
// k ≠ l when the two blocks are the same (`diagonal`). Each row is summed in float64 in
// column order and the row sums in row order: the same result for any thread count.
template <typename G>
NCFAST_INLINE void tile_rows(const G* cosines, int64_t stride, int64_t cols, const double* norm_r, const double* norm_c,
                             const double* var_r, const double* var_c, double shift, double mean, bool diagonal,
                             int64_t r0, int64_t r1, double* abs_sums, double* cdnv_sums, double* sq_sums) {
  for (int64_t r = r0; r < r1; ++r) {
    const G* c = cosines + r * stride;
    const double nr = norm_r[r], nr2 = nr * nr;
    double abs_sum = 0.0, cdnv_sum = 0.0, sq_sum = 0.0;
    if (var_r != nullptr) {
      const double vr = var_r[r];
#pragma omp simd reduction(+ : abs_sum, cdnv_sum, sq_sum)
      for (int64_t l = 0; l < cols; ++l) {
        const double cos = static_cast<double>(c[l]);
        const double distance_sq = nr2 + norm_c[l] * norm_c[l] - 2.0 * nr * norm_c[l] * cos;
        const bool keep = !diagonal || l != r;
        abs_sum += keep ? std::fabs(cos + shift) : 0.0;
        sq_sum += keep ? (cos - mean) * (cos - mean) : 0.0;
        cdnv_sum += keep ? (vr + var_c[l]) / (2.0 * distance_sq) : 0.0;
      }
    } else {
#pragma omp simd reduction(+ : abs_sum, sq_sum)
      for (int64_t l = 0; l < cols; ++l) {
        const double cos = static_cast<double>(c[l]);
        const bool keep = !diagonal || l != r;
        abs_sum += keep ? std::fabs(cos + shift) : 0.0;
        sq_sum += keep ? (cos - mean) * (cos - mean) : 0.0;
      }
    }
    abs_sums[r] = abs_sum;
    cdnv_sums[r] = cdnv_sum;
    sq_sums[r] = sq_sum;
  }
}

NCFAST_CLONES void tile_f32(const float* c, int64_t s, int64_t n, const double* a, const double* b, const double* va,
                            const double* vb, double shift, double mean, bool diag, int64_t r0, int64_t r1, double* o1,
                            double* o2, double* o3) {
  tile_rows(c, s, n, a, b, va, vb, shift, mean, diag, r0, r1, o1, o2, o3);
}
NCFAST_CLONES void tile_f64(const double* c, int64_t s, int64_t n, const double* a, const double* b, const double* va,
                            const double* vb, double shift, double mean, bool diag, int64_t r0, int64_t r1, double* o1,
                            double* o2, double* o3) {
  tile_rows(c, s, n, a, b, va, vb, shift, mean, diag, r0, r1, o1, o2, o3);
}

// ncstats_pairwise_tile(cosines, norms_rows, norms_cols, variances_rows, variances_cols,
//                       shift, mean, diagonal, num_threads)
//     -> (Σ|cos + shift|, Σ CDNV terms, Σ (cos − mean)²)
// cosines: (R, C) float32 or float64 with contiguous rows; norms (R,), (C,) float64;
// variances (R,), (C,) float64, or empty arrays for no CDNV.
py::tuple ncstats_pairwise_tile(const py::buffer& cosines_buf, const py::buffer& norms_r_buf,
                                const py::buffer& norms_c_buf, const py::buffer& var_r_buf, const py::buffer& var_c_buf,
                                double shift, double mean, bool diagonal, int num_threads) {
  const py::buffer_info info = cosines_buf.request();
  if (info.itemsize != 4 && info.itemsize != 8) throw py::type_error("cosines: expected float32 or float64");
  View cosines = view_of(cosines_buf, "cosines", 2, info.itemsize, false);
  const int64_t R = cosines.rows, C = cosines.cols;
  if (diagonal && R != C) throw py::value_error("cosines: a diagonal tile must be square");
  const double* norm_r = state_of(norms_r_buf, "norms_rows", 1, R, 1, false);
  const double* norm_c = state_of(norms_c_buf, "norms_cols", 1, C, 1, false);
  const bool cdnv = view_of(var_r_buf, "variances_rows", 1, sizeof(double), false).rows > 0;
  const double* var_r = cdnv ? state_of(var_r_buf, "variances_rows", 1, R, 1, false) : nullptr;
  const double* var_c = cdnv ? state_of(var_c_buf, "variances_cols", 1, C, 1, false) : nullptr;
  std::vector<double> abs_sums(static_cast<size_t>(R)), cdnv_sums(static_cast<size_t>(R)), sq_sums(static_cast<size_t>(R));
  {
    py::gil_scoped_release release;
    const int threads = static_cast<int>(std::min<int64_t>(thread_count(num_threads), std::max<int64_t>(1, R * C >> 20)));
    parallel_ranges(R, threads, [&](int64_t r0, int64_t r1) {
      if (info.itemsize == 4)
        tile_f32(static_cast<const float*>(cosines.data), cosines.row_stride, C, norm_r, norm_c, var_r, var_c, shift,
                 mean, diagonal, r0, r1, abs_sums.data(), cdnv_sums.data(), sq_sums.data());
      else
        tile_f64(static_cast<const double*>(cosines.data), cosines.row_stride, C, norm_r, norm_c, var_r, var_c, shift,
                 mean, diagonal, r0, r1, abs_sums.data(), cdnv_sums.data(), sq_sums.data());
    });
  }
  double abs_total = 0.0, cdnv_total = 0.0, sq_total = 0.0;
  for (int64_t r = 0; r < R; ++r) {
    abs_total += abs_sums[r];
    cdnv_total += cdnv_sums[r];
    sq_total += sq_sums[r];
  }
  return py::make_tuple(abs_total, cdnv_total, sq_total);
}

}  // namespace

void register_ncstats(py::module_& m) {
  m.def("ncstats_update", &ncstats_update, py::arg("features"), py::arg("target"), py::arg("dtype"),
        py::arg("classes"), py::arg("state_counts"), py::arg("state_means"), py::arg("state_class_sq"),
        py::arg("means"), py::arg("centred"), py::arg("num_threads"),
        "Folds a batch (labels compacted to its classes) into the counts, means and class_sq of the state and "
        "writes its rows centred so that 2^(2e) times their Gram is the batch scatter plus Chan's correction; "
        "returns e.");
  m.def("ncstats_pairwise_tile", &ncstats_pairwise_tile, py::arg("cosines"), py::arg("norms_rows"),
        py::arg("norms_cols"), py::arg("variances_rows"), py::arg("variances_cols"), py::arg("shift"), py::arg("mean"),
        py::arg("diagonal"), py::arg("num_threads"),
        "Sums of |cos + shift| and of the CDNV terms over one tile of pairwise cosines.");
}

}  // namespace ncfast
