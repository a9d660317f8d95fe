// Fused loss + gradient for cross-entropy (label smoothing), focal and rescaled MSE (SPEC §1).
//
// One call handles a block of rows. Per row: one sweep reads the logits (max, NaN check, Σz),
// one sweep computes exp(z - max) once per logit into the gradient buffer (or an fp32 scratch
// row for 16-bit logits) while summing it, and a last sweep over the cache-resident row turns
// it into the gradient. Every loss is a small function from the row's statistics to
// (loss, a, c, g_y): g_j = scale·(a·v_j + c) for j ≠ y and g_y = scale·g_y, with v_j the
// stored exp (softmax losses) or the logit itself (MSE).
#include <algorithm>
#include <type_traits>
#include <limits>
#include <vector>

#include "common.h"

namespace ncfast {
namespace {

enum LossKind : int { kCrossEntropy = 0, kFocal = 1, kRescaledMSE = 2 };

struct LossOptions {
  int kind;
  double label_smoothing;
  double gamma;
  double kappa;
  double beta;
};

// What a loss makes of one row, class weights included: the loss and the gradient in the form
// g_j = a·v_j + c·u_j (j ≠ y), g_y = grad_target, where v_j is exp(z_j - max) for the softmax
// losses and z_j for the MSE, and u_j is the class weight w_j (1 without weights).
template <typename A>
struct RowResult {
  A loss, a, c, grad_target;
};

// Softmax statistics of one row: max m, S = Σ_j exp(z_j - m), z_y, Σ_j w_j z_j, and the class
// weights w_y and W = Σ_j w_j (1 and K without weights).
template <typename A>
struct SoftmaxRow {
  A max, sumexp, target_logit, weighted_sum, target_weight, total_weight;
  int64_t num_classes;
};

// log p_y and 1 - p_y = -expm1(log p_y), accurate as p_y -> 1 (SPEC §1, Liger PR #1329).
template <typename A>
NCFAST_INLINE void target_log_prob(const SoftmaxRow<A>& r, A& log_p, A& one_minus_p) {
  log_p = (r.target_logit - r.max) - std::log(r.sumexp);
  one_minus_p = -std::expm1(log_p);
}

// ℓ = (1-α) w_y (lse - z_y) + (α/K) Σ_j w_j (lse - z_j): torch's weighted label smoothing,
// which is w_y (lse - Σ q_j z_j), q = (1-α)e_y + α/K, without weights.
// g_j = p_j((1-α) w_y + α W/K) - (α/K) w_j - (1-α) w_y δ_jy.
template <typename A>
NCFAST_INLINE RowResult<A> cross_entropy_row(const SoftmaxRow<A>& r, A smoothing) {
  A log_p, one_minus_p;
  target_log_prob(r, log_p, one_minus_p);
  const A w_y = r.target_weight, W = r.total_weight, uniform = smoothing / static_cast<A>(r.num_classes);
  A loss = -(1 - smoothing) * w_y * log_p;
  if (smoothing > 0) {
    // Σ_j w_j (lse - z_j), written around the max so that it stays exact for large logits.
    loss += uniform * ((W * r.max - r.weighted_sum) + W * std::log(r.sumexp));
  }
  const A p_coef = (1 - smoothing) * w_y + uniform * W;
  const A p_y = 1 - one_minus_p;
  // g_y without forming p_y - 1 in low precision.
  const A grad_target = -(1 - smoothing) * w_y * one_minus_p + uniform * (W * p_y - w_y);
  return {loss, p_coef / r.sumexp, -uniform, grad_target};
}

// ℓ = -w_y α_y (1-p_y)^γ log p_y;  g_j = w_y α_y c(δ_jy - p_j) with
// c = γ(1-p_y)^{γ-1} p_y log p_y - (1-p_y)^γ = (1-p_y)^γ (γ p_y · log p_y/(1-p_y) - 1),
// where log p_y/(1-p_y) -> -1 as p_y -> 1: finite for every γ ≥ 0, and γ = 0 gives CE exactly.
template <typename A>
NCFAST_INLINE RowResult<A> focal_row(const SoftmaxRow<A>& r, A gamma, A alpha_y) {
  A log_p, one_minus_p;
  target_log_prob(r, log_p, one_minus_p);
  const A factor = r.target_weight * alpha_y;
  const A p = 1 - one_minus_p;
  const A modulator = std::pow(one_minus_p, gamma);  // pow(0, 0) = 1
  const A log_ratio = one_minus_p > 0 ? log_p / one_minus_p : A(-1);
  const A c = modulator * (gamma * p * log_ratio - 1);
  return {-factor * modulator * log_p, -factor * c / r.sumexp, A(0), factor * c * one_minus_p};
}

// ℓ = w_y (κ(z_y - β)² + Σ_{j≠y} z_j²);  g_j = 2 w_y z_j, g_y = 2 w_y κ(z_y - β).
template <typename A>
NCFAST_INLINE RowResult<A> rescaled_mse_row(A target_logit, A sumsq_others, A target_weight, A kappa, A beta) {
  const A d = target_logit - beta;
  return {target_weight * (kappa * d * d + sumsq_others), 2 * target_weight, A(0), 2 * target_weight * kappa * d};
}

template <typename T>
struct LossArgs {
  using A = typename acc_of<T>::type;
  const T* logits;
  int64_t logits_stride;
  const int64_t* target;
  int64_t target_stride;
  const double* class_weight;  // (K,) or null
  const double* alpha;         // (K,) or null (focal only)
  T* grad;
  int64_t grad_stride;
  A* row_loss;
  int64_t num_rows, num_classes;
  int64_t ignore_index;
  double total_class_weight;  // W = Σ_j w_j
  double grad_scale;          // 1/Σ_i w_{y_i} for reduction="mean", else 1
  LossOptions opt;
};

template <typename T>
NCFAST_INLINE void loss_rows(const LossArgs<T>& args, int64_t begin, int64_t end,
                             typename acc_of<T>::type* scratch) {
  using A = typename acc_of<T>::type;
  const int64_t K = args.num_classes;
  const LossOptions& opt = args.opt;
  const A nan = std::numeric_limits<A>::quiet_NaN();
  for (int64_t i = begin; i < end; ++i) {
    const T* z = args.logits + i * args.logits_stride;
    T* g = args.grad + i * args.grad_stride;
    const int64_t y = args.target[i * args.target_stride];
    if (y == args.ignore_index) {
      for (int64_t j = 0; j < K; ++j) g[j] = from_acc<T>(0);
      args.row_loss[i] = 0;
      continue;
    }
    const A w_y = args.class_weight ? static_cast<A>(args.class_weight[y]) : A(1);
    const A target_logit = to_float(z[y]);
    // Per-column weights enter the gradient only through weighted label smoothing.
    const bool column_weights = args.class_weight && opt.kind == kCrossEntropy && opt.label_smoothing > 0;
    RowResult<A> r;
    const A* v = nullptr;  // v_j for the gradient sweep; null: the logits themselves

    if (opt.kind == kRescaledMSE) {
      A sumsq = 0;
#pragma omp simd reduction(+ : sumsq)
      for (int64_t j = 0; j < y; ++j) sumsq += to_float(z[j]) * to_float(z[j]);
#pragma omp simd reduction(+ : sumsq)
      for (int64_t j = y + 1; j < K; ++j) sumsq += to_float(z[j]) * to_float(z[j]);
      r = rescaled_mse_row<A>(target_logit, sumsq, w_y, A(opt.kappa), A(opt.beta));
    } else {
      A max = -std::numeric_limits<A>::infinity(), weighted_sum = 0;
      int has_nan = 0;
      if (column_weights) {
        const double* w = args.class_weight;
#pragma omp simd reduction(max : max) reduction(| : has_nan) reduction(+ : weighted_sum)
        for (int64_t j = 0; j < K; ++j) {
          A zj = to_float(z[j]);
          max = zj > max ? zj : max;
          has_nan |= (zj != zj);
          weighted_sum += static_cast<A>(w[j]) * zj;
        }
      } else {
#pragma omp simd reduction(max : max) reduction(| : has_nan) reduction(+ : weighted_sum)
        for (int64_t j = 0; j < K; ++j) {
          A zj = to_float(z[j]);
          max = zj > max ? zj : max;
          has_nan |= (zj != zj);
          weighted_sum += zj;
        }
      }
      // exp(z - max) is stored once; for fp32/fp64 in the gradient buffer itself (safe when
      // it aliases the logits: each element is read before it is overwritten).
      A* e = scratch ? scratch : reinterpret_cast<A*>(g);
      A sumexp = 0;
#pragma omp simd reduction(+ : sumexp)
      for (int64_t j = 0; j < K; ++j) {
        A ej = vexp(to_float(z[j]) - max);
        e[j] = ej;
        sumexp += ej;
      }
      v = e;
      if (has_nan || !std::isfinite(max)) {
        // NaN or +inf anywhere in the row (or all -inf): the row is NaN, as in torch.
        r = {nan, nan, nan, nan};
      } else {
        const A W = column_weights ? static_cast<A>(args.total_class_weight) : static_cast<A>(K);
        SoftmaxRow<A> row{max, sumexp, target_logit, weighted_sum, w_y, W, K};
        r = opt.kind == kFocal ? focal_row<A>(row, A(opt.gamma), args.alpha ? A(args.alpha[y]) : A(1))
                               : cross_entropy_row<A>(row, A(opt.label_smoothing));
      }
    }

    const A scale = static_cast<A>(args.grad_scale);
    const A ga = scale * r.a, gc = scale * r.c;
    if (column_weights) {
      const double* w = args.class_weight;
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) g[j] = from_acc<T>(ga * v[j] + gc * static_cast<A>(w[j]));
    } else if (v) {
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) g[j] = from_acc<T>(ga * v[j] + gc);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < K; ++j) g[j] = from_acc<T>(ga * to_float(z[j]) + gc);
    }
    g[y] = from_acc<T>(scale * r.grad_target);
    args.row_loss[i] = r.loss;
  }
}

// One clone set per element type (target_clones does not apply to templates directly).
template <typename T>
using RowsFn = void (*)(const LossArgs<T>&, int64_t, int64_t, typename acc_of<T>::type*);

NCFAST_CLONES void loss_rows_f32(const LossArgs<float>& a, int64_t b, int64_t e, float* s) { loss_rows(a, b, e, s); }
NCFAST_CLONES void loss_rows_f64(const LossArgs<double>& a, int64_t b, int64_t e, double* s) { loss_rows(a, b, e, s); }
NCFAST_CLONES void loss_rows_bf16(const LossArgs<bf16>& a, int64_t b, int64_t e, float* s) { loss_rows(a, b, e, s); }
NCFAST_CLONES void loss_rows_f16(const LossArgs<f16>& a, int64_t b, int64_t e, float* s) { loss_rows(a, b, e, s); }

// Checks every target (out-of-range values are reported, never read through) and returns
// Σ_i w_{y_i} over the rows that are not ignored.
double check_targets(const int64_t* target, int64_t stride, int64_t n, int64_t num_classes,
                     int64_t ignore_index, const double* class_weight) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    int64_t y = target[i * stride];
    if (y == ignore_index) continue;
    if (y < 0 || y >= num_classes) {
      throw py::value_error("target: value " + std::to_string(y) + " at index " + std::to_string(i) +
                            " is out of range [0, " + std::to_string(num_classes) +
                            ") and is not ignore_index=" + std::to_string(ignore_index));
    }
    total += class_weight ? class_weight[y] : 1.0;
  }
  return total;
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

template <typename T>
double run_loss(const View& logits, const View& grad, const View& target, const View& row_loss,
                const double* class_weight, const double* alpha, const LossOptions& opt,
                int64_t ignore_index, bool mean, int num_threads, RowsFn<T> rows_fn) {
  using A = typename acc_of<T>::type;
  LossArgs<T> args;
  args.logits = static_cast<const T*>(logits.data);
  args.logits_stride = logits.row_stride;
  args.target = static_cast<const int64_t*>(target.data);
  args.target_stride = target.row_stride;
  args.class_weight = class_weight;
  args.alpha = alpha;
  args.grad = static_cast<T*>(grad.data);
  args.grad_stride = grad.row_stride;
  args.row_loss = static_cast<A*>(row_loss.data);
  args.num_rows = logits.rows;
  args.num_classes = logits.cols;
  args.ignore_index = ignore_index;
  args.opt = opt;

  py::gil_scoped_release release;
  const int64_t N = args.num_rows, K = args.num_classes;
  const double total_weight = check_targets(args.target, args.target_stride, N, K, ignore_index, class_weight);
  args.grad_scale = mean ? 1.0 / total_weight : 1.0;
  args.total_class_weight = 0;
  if (class_weight)
    for (int64_t k = 0; k < K; ++k) args.total_class_weight += class_weight[k];
  if (N == 0 || K == 0) return total_weight;

  // Below ~64K logits a thread costs more than it saves.
  const int64_t work_threads = std::max<int64_t>(1, (N * K) / 65536);
  const int threads = static_cast<int>(std::min<int64_t>({thread_count(num_threads), work_threads, N}));
  const bool need_scratch = !std::is_same<T, A>::value && opt.kind != kRescaledMSE;
#pragma omp parallel num_threads(threads)
  {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    std::vector<A> scratch(need_scratch ? K : 0);
    const int64_t begin = N * t / nt, end = N * (t + 1) / nt;
    rows_fn(args, begin, end, need_scratch ? scratch.data() : nullptr);
  }
  return total_weight;
}

// loss_forward(logits, target, grad, row_loss, dtype, kind, ...) -> Σw
// logits, grad: (N, K) rows contiguous (grad may be the logits buffer itself); target: (N,)
// int64; row_loss: (N,) fp32 (fp64 for fp64 logits), receives w_y·ℓ_i; class_weight, alpha:
// (K,) float64 or None. The gradient row i is w_y·∂ℓ_i/∂z_i, divided by Σw when mean is true.
double loss_forward(const py::buffer& logits_buf, const py::buffer& target_buf, const py::buffer& grad_buf,
                    const py::buffer& row_loss_buf, const std::string& dtype, int kind, double label_smoothing,
                    double gamma, double kappa, double beta, const py::object& class_weight_obj,
                    const py::object& alpha_obj, int64_t ignore_index, bool mean, int num_threads) {
  if (kind < kCrossEntropy || kind > kRescaledMSE) throw py::value_error("kind: unknown loss");
  size_t itemsize = dtype == "float64" ? 8 : dtype == "float32" ? 4 : (dtype == "bfloat16" || dtype == "float16") ? 2 : 0;
  if (itemsize == 0) throw py::type_error("logits: unsupported dtype " + dtype);
  View logits = view_of(logits_buf, "logits", 2, itemsize, false);
  View grad = view_of(grad_buf, "grad", 2, itemsize, true);
  View target = view_of(target_buf, "target", 1, sizeof(int64_t), false);
  View row_loss = view_of(row_loss_buf, "row_loss", 1, dtype == "float64" ? 8 : 4, true);
  if (grad.rows != logits.rows || grad.cols != logits.cols) throw py::value_error("grad: shape differs from logits");
  if (target.rows != logits.rows) throw py::value_error("target: length differs from logits' rows");
  if (row_loss.rows != logits.rows || (row_loss.row_stride != 1 && row_loss.rows > 1))
    throw py::value_error("row_loss: expected a contiguous vector with one entry per row");
  const double* class_weight = optional_vector(class_weight_obj, "weight", logits.cols);
  const double* alpha = optional_vector(alpha_obj, "alpha", logits.cols);
  LossOptions opt{kind, label_smoothing, gamma, kappa, beta};
  if (dtype == "float32")
    return run_loss<float>(logits, grad, target, row_loss, class_weight, alpha, opt, ignore_index, mean, num_threads, loss_rows_f32);
  if (dtype == "float64")
    return run_loss<double>(logits, grad, target, row_loss, class_weight, alpha, opt, ignore_index, mean, num_threads, loss_rows_f64);
  if (dtype == "bfloat16")
    return run_loss<bf16>(logits, grad, target, row_loss, class_weight, alpha, opt, ignore_index, mean, num_threads, loss_rows_bf16);
  return run_loss<f16>(logits, grad, target, row_loss, class_weight, alpha, opt, ignore_index, mean, num_threads, loss_rows_f16);
}

}  // namespace

void register_losses(py::module_& m) {
  m.def("loss_forward", &loss_forward, py::arg("logits"), py::arg("target"), py::arg("grad"), py::arg("row_loss"),
        py::arg("dtype"), py::arg("kind"), py::arg("label_smoothing"), py::arg("gamma"), py::arg("kappa"),
        py::arg("beta"), py::arg("class_weight"), py::arg("alpha"), py::arg("ignore_index"), py::arg("mean"),
        py::arg("num_threads"),
        "Fused loss and gradient for a block of rows; returns the total weight Σw of the counted rows.");
  m.attr("LOSS_KINDS") = py::make_tuple("cross_entropy", "focal", "rescaled_mse");
}

}  // namespace ncfast
