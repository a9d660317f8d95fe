// The batch kernels of the streaming NC statistics (SPEC §3).
//
// ncstats_batch: per-class counts and float64 means of a batch, its rows C centred, and K
// rows R such that CᵀC ± RᵀR is the batch scatter plus Chan's correction
// (M_W^batch + Σ_k n_k^a n_k^b/(n_k^a+n_k^b) δ_k δ_kᵀ, δ_k = ν_k − μ_k). Two ways, one per batch:
//
// * one pass (every class of the batch already has running statistics): rows are centred on
//   the running means μ_k, known before the batch, so the batch is read once. CᵀC is
//   M_W^batch + Σ n_k^b δδᵀ; R = √((n^b)²/(n^a+n^b)) δ_k is SUBTRACTED (sign −1). In fp32
//   this loses nothing: μ_k is within the class spread of ν_k, so the rows stay small. The
//   caller may collect the R of many batches and subtract them in one Gram.
// * two passes (some class is new): class sums first, rows centred on the batch means ν_k,
//   and R = √(n^a n^b/(n^a+n^b)) δ_k is ADDED (sign +1).
//
// ncstats_fold then merges counts, means and the Gram into the float64 state
// (single-threaded: K·d + d² work, too small to split).
//
// The batch work is split by blocks of columns, not rows: each thread owns whole columns, so
// the per-class sums need no cross-thread reduction and are bit-identical for any thread
// count; each thread still streams through the rows in order. Rows are written in float32
// (float64 for float64 input); the per-class squared distances Σ_{i∈k} ‖h_i − ν_k‖² (for the
// CDNV) come along.
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
  const int64_t* target;
  int64_t target_stride;
  const double* counts;        // (K,) batch counts
  const double* state_counts;  // (K,) running counts n_k^a
  const double* state_means;   // (K, d) running means μ_k
  double* means;               // (K, d) rows contiguous
  C* centred;                  // (N, d)
  int64_t centred_stride;
  C* correction;  // (K, d): Chan's correction rows R
  int64_t correction_stride;
  double* block_sq;  // (blocks, K): block b's share of Σ_{i∈k} ‖h_i − ν_k‖²
  int64_t rows, dim, classes;
  bool one_pass;  // centre on the running means (every class of the batch seen before)
};

// Every pass walks the rows in order and, in each row, the thread's own column blocks
// [b0, b1): the batch streams through memory once per pass (a column strip per pass would
// touch every page of the batch once per block and thrash the TLB). Per-class squared
// distances are kept per 64-column block so that their sum does not depend on the split.

// Σ_{i∈k} h_i over the thread's columns (two-pass mode, first pass).
template <typename T, typename C>
NCFAST_INLINE void class_sums(const BatchArgs<T, C>& a, int64_t b0, int64_t b1) {
  const int64_t d = a.dim, c0 = b0 * kColumnBlock, c1 = std::min(b1 * kColumnBlock, d);
  for (int64_t i = 0; i < a.rows; ++i) {
    const T* x = a.features + i * a.features_stride;
    double* m = a.means + a.target[i * a.target_stride] * d;
#pragma omp simd
    for (int64_t j = c0; j < c1; ++j) m[j] += static_cast<double>(to_float(x[j]));
  }
}

// Rows h_i − centre_{y_i} (written in C) and their per-block squared norms; with `accumulate`
// also Σ (h_i − centre_{y_i}) per class into a.means (one-pass mode).
template <typename T, typename C>
NCFAST_INLINE void centre_rows(const BatchArgs<T, C>& a, int64_t b0, int64_t b1, const double* centre, bool accumulate) {
  const int64_t d = a.dim, K = a.classes;
  for (int64_t i = 0; i < a.rows; ++i) {
    const int64_t y = a.target[i * a.target_stride];
    const T* x = a.features + i * a.features_stride;
    const double* m = centre + y * d;
    double* s = a.means + y * d;
    C* c = a.centred + i * a.centred_stride;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kColumnBlock, j1 = std::min(j0 + kColumnBlock, d);
      double row_sq = 0.0;
      if (accumulate) {
#pragma omp simd reduction(+ : row_sq)
        for (int64_t j = j0; j < j1; ++j) {
          const double v = static_cast<double>(to_float(x[j])) - m[j];
          c[j] = static_cast<C>(v);
          s[j] += v;
          row_sq += v * v;
        }
      } else {
#pragma omp simd reduction(+ : row_sq)
        for (int64_t j = j0; j < j1; ++j) {
          const double v = static_cast<double>(to_float(x[j])) - m[j];
          c[j] = static_cast<C>(v);
          row_sq += v * v;
        }
      }
      a.block_sq[b * K + y] += row_sq;
    }
  }
}

template <typename T, typename C>
NCFAST_INLINE void moments_blocks(const BatchArgs<T, C>& a, int64_t b0, int64_t b1) {
  const int64_t d = a.dim, K = a.classes, c0 = b0 * kColumnBlock, c1 = std::min(b1 * kColumnBlock, d);
  for (int64_t k = 0; k < K; ++k) {
    double* m = a.means + k * d;
    for (int64_t j = c0; j < c1; ++j) m[j] = 0.0;
  }
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t k = 0; k < K; ++k) a.block_sq[b * K + k] = 0.0;
  if (!a.one_pass) {
    // Two passes: means ν_k, rows h − ν_y, then the rows √(n^a n^b/(n^a+n^b)) δ_k (added).
    class_sums(a, b0, b1);
    for (int64_t k = 0; k < K; ++k) {
      const double n = a.counts[k];
      if (n == 0) continue;
      double* m = a.means + k * d;
#pragma omp simd
      for (int64_t j = c0; j < c1; ++j) m[j] /= n;
    }
    centre_rows(a, b0, b1, a.means, false);
    for (int64_t k = 0; k < K; ++k) {
      const double na = a.state_counts[k], nb = a.counts[k];
      const double scale = na > 0 && nb > 0 ? std::sqrt(na * nb / (na + nb)) : 0.0;
      const double* m = a.means + k * d;
      const double* mu = a.state_means + k * d;
      C* c = a.correction + k * a.correction_stride;
#pragma omp simd
      for (int64_t j = c0; j < c1; ++j) c[j] = static_cast<C>(scale * (m[j] - mu[j]));
    }
    return;
  }
  // One pass: rows h − μ_y and their class sums, then δ = ν − μ = the sums / n^b, the rows
  // √((n^b)²/(n^a+n^b)) δ_k (subtracted), and Σ‖h − ν‖² = Σ‖h − μ‖² − n^b ‖δ‖² per block.
  centre_rows(a, b0, b1, a.state_means, true);
  for (int64_t k = 0; k < K; ++k) {
    const double na = a.state_counts[k], nb = a.counts[k];
    double* m = a.means + k * d;
    const double* mu = a.state_means + k * d;
    C* c = a.correction + k * a.correction_stride;
    const double scale = nb > 0 ? nb / std::sqrt(na + nb) : 0.0, inv = nb > 0 ? 1.0 / nb : 0.0;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t j0 = b * kColumnBlock, j1 = std::min(j0 + kColumnBlock, d);
      double delta_sq = 0.0;
#pragma omp simd reduction(+ : delta_sq)
      for (int64_t j = j0; j < j1; ++j) {
        const double delta = m[j] * inv;
        delta_sq += delta * delta;
        c[j] = static_cast<C>(scale * delta);
        m[j] = nb > 0 ? mu[j] + delta : 0.0;
      }
      a.block_sq[b * K + k] -= nb * delta_sq;
    }
  }
}

// Non-template entry points: target_clones needs plain functions.
NCFAST_CLONES void moments_f32(const BatchArgs<float, float>& a, int64_t b, int64_t e) { moments_blocks(a, b, e); }
NCFAST_CLONES void moments_f64(const BatchArgs<double, double>& a, int64_t b, int64_t e) { moments_blocks(a, b, e); }
NCFAST_CLONES void moments_bf16(const BatchArgs<bf16, float>& a, int64_t b, int64_t e) { moments_blocks(a, b, e); }
NCFAST_CLONES void moments_f16(const BatchArgs<f16, float>& a, int64_t b, int64_t e) { moments_blocks(a, b, e); }

template <typename T, typename C>
void run_moments(const View& features, const View& target, const double* counts, const double* state_counts,
                 const double* state_means, double* means, const View& centred, const View& correction,
                 double* class_sq, int64_t classes,
                 int num_threads, bool one_pass,
                 void (*blocks_fn)(const BatchArgs<T, C>&, int64_t, int64_t)) {
  const int64_t blocks = (features.cols + kColumnBlock - 1) / kColumnBlock;
  std::vector<double> block_sq(static_cast<size_t>(blocks * classes));
  BatchArgs<T, C> a{static_cast<const T*>(features.data), features.row_stride,
                    static_cast<const int64_t*>(target.data), target.row_stride, counts, state_counts, state_means, means,
                    static_cast<C*>(centred.data), centred.row_stride,
                    static_cast<C*>(correction.data), correction.row_stride, block_sq.data(),
                    features.rows, features.cols, classes, one_pass};
  bool finite = true;
  {
    py::gil_scoped_release release;
    // The pass is bound by memory traffic, which one core nearly saturates: a second thread
    // only pays off from ~4M values (16 MB of fp32) per thread, and on a busy machine a
    // parallel region waits for its slowest thread.
    const int64_t work_threads = std::max<int64_t>(1, (features.rows * features.cols) >> 22);
    const int threads = static_cast<int>(std::min<int64_t>({thread_count(num_threads), work_threads, blocks}));
    parallel_ranges(blocks, threads, [&](int64_t begin, int64_t end) { blocks_fn(a, begin, end); });
    // Fixed block order: the same sum for any thread count.
    for (int64_t k = 0; k < classes; ++k) {
      double total = 0.0;
      for (int64_t b = 0; b < blocks; ++b) total += block_sq[b * classes + k];
      class_sq[k] = total;
    }
    // A NaN or ±inf feature makes its class sum non-finite: K·d values to check, not N·d.
    for (int64_t i = 0; i < classes * features.cols; ++i) finite &= std::isfinite(means[i]);
  }
  if (!finite) throw py::value_error("features: contains NaN or infinite values");
}

// Checks a contiguous float64 state buffer of the given shape.
double* state_of(const py::buffer& buffer, const char* name, int ndim, int64_t rows, int64_t cols, bool writable) {
  View v = view_of(buffer, name, ndim, sizeof(double), writable);
  const bool contiguous = ndim == 1 ? (v.row_stride == 1 || rows <= 1) : (v.row_stride == cols || rows <= 1);
  if (v.rows != rows || v.cols != cols || !contiguous) {
    throw py::value_error(std::string(name) + ": expected a contiguous float64 buffer of shape (" +
                          std::to_string(rows) + (ndim == 2 ? ", " + std::to_string(cols) : std::string(",")) + ")");
  }
  return static_cast<double*>(v.data);
}

// ncstats_batch(features, target, dtype, state_counts, state_means, counts, means, centred,
//               correction, class_sq, num_threads)
// features: (N, d) rows contiguous, float32/float64/bfloat16 (as int16)/float16; target: (N,)
// int64 in [0, K); state_counts (K,), state_means (K, d): the running state (read only).
// Writes counts (K,), means (K, d) and class_sq (K,) of the batch in float64, and in float32
// (float64 for float64 features) the centred rows C (N, d) and Chan's rows R (K, d).
// Returns the sign s: M_W^batch + Chan's correction = CᵀC + s·RᵀR.
// Raises ValueError for a target out of range or a non-finite feature.
int ncstats_batch(const py::buffer& features_buf, const py::buffer& target_buf, const std::string& dtype,
                   const py::buffer& state_counts_buf, const py::buffer& state_means_buf, const py::buffer& counts_buf,
                   const py::buffer& means_buf, const py::buffer& centred_buf, const py::buffer& correction_buf,
                   const py::buffer& class_sq_buf,
                   int num_threads) {
  const size_t itemsize = dtype == "float64" ? 8 : dtype == "float32" ? 4 : (dtype == "bfloat16" || dtype == "float16") ? 2 : 0;
  if (itemsize == 0) throw py::type_error("features: unsupported dtype " + dtype);
  View features = view_of(features_buf, "features", 2, itemsize, false);
  View target = view_of(target_buf, "target", 1, sizeof(int64_t), false);
  View counts_view = view_of(counts_buf, "counts", 1, sizeof(double), true);
  View centred = view_of(centred_buf, "centred", 2, dtype == "float64" ? 8 : 4, true);
  View correction = view_of(correction_buf, "correction", 2, dtype == "float64" ? 8 : 4, true);
  const int64_t N = features.rows, d = features.cols, K = counts_view.rows;
  if (K < 1) throw py::value_error("counts: expected at least one class");
  double* counts = state_of(counts_buf, "counts", 1, K, 1, true);
  double* means = state_of(means_buf, "means", 2, K, d, true);
  double* class_sq = state_of(class_sq_buf, "class_sq", 1, K, 1, true);
  const double* state_counts = state_of(state_counts_buf, "state_counts", 1, K, 1, false);
  const double* state_means = state_of(state_means_buf, "state_means", 2, K, d, false);
  if (target.rows != N) throw py::value_error("target: length differs from features' rows");
  if (centred.rows != N || centred.cols != d) throw py::value_error("centred: expected shape (N, d)");
  if (correction.rows != K || correction.cols != d) throw py::value_error("correction: expected shape (K, d)");

  // Validate every class index before any is used as an offset.
  std::fill(counts, counts + K, 0.0);
  const int64_t* y = static_cast<const int64_t*>(target.data);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t k = y[i * target.row_stride];
    if (k < 0 || k >= K) {
      throw py::value_error("target: value " + std::to_string(k) + " at index " + std::to_string(i) +
                            " is out of range [0, " + std::to_string(K) + ")");
    }
    counts[k] += 1.0;
  }
  bool one_pass = true;
  for (int64_t k = 0; k < K; ++k) one_pass &= counts[k] == 0 || state_counts[k] > 0;
  if (dtype == "float32")
    run_moments<float, float>(features, target, counts, state_counts, state_means, means, centred, correction, class_sq, K,
                              num_threads, one_pass, moments_f32);
  else if (dtype == "float64")
    run_moments<double, double>(features, target, counts, state_counts, state_means, means, centred, correction, class_sq, K,
                                num_threads, one_pass, moments_f64);
  else if (dtype == "bfloat16")
    run_moments<bf16, float>(features, target, counts, state_counts, state_means, means, centred, correction, class_sq, K,
                             num_threads, one_pass, moments_bf16);
  else
    run_moments<f16, float>(features, target, counts, state_counts, state_means, means, centred, correction, class_sq, K,
                            num_threads, one_pass, moments_f16);
  return one_pass ? -1 : 1;
}

template <typename G>
void add_gram(double* scatter, const G* gram, int64_t size) {
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) scatter[i] += static_cast<double>(gram[i]);
}

// ncstats_fold(state_counts, state_means, state_class_sq, state_scatter, counts, means,
//              class_sq, gram): Chan's merge of a batch into the float64 state, in place.
// gram (d, d) float32 or float64 already holds the batch scatter plus Chan's correction.
void ncstats_fold(const py::buffer& state_counts_buf, const py::buffer& state_means_buf,
                  const py::buffer& state_class_sq_buf, const py::buffer& state_scatter_buf, const py::buffer& counts_buf,
                  const py::buffer& means_buf, const py::buffer& class_sq_buf, const py::buffer& gram_buf) {
  View counts_view = view_of(counts_buf, "counts", 1, sizeof(double), false);
  View means_view = view_of(means_buf, "means", 2, sizeof(double), false);
  const int64_t K = counts_view.rows, d = means_view.cols;
  double* state_counts = state_of(state_counts_buf, "state_counts", 1, K, 1, true);
  double* state_means = state_of(state_means_buf, "state_means", 2, K, d, true);
  double* state_class_sq = state_of(state_class_sq_buf, "state_class_sq", 1, K, 1, true);
  double* scatter = state_of(state_scatter_buf, "state_scatter", 2, d, d, true);
  const double* counts = state_of(counts_buf, "counts", 1, K, 1, false);
  const double* means = state_of(means_buf, "means", 2, K, d, false);
  const double* class_sq = state_of(class_sq_buf, "class_sq", 1, K, 1, false);
  py::buffer_info gram = gram_buf.request();
  const bool gram64 = gram.itemsize == 8;
  if (gram.ndim != 2 || gram.shape[0] != d || gram.shape[1] != d || (gram.itemsize != 4 && !gram64) ||
      gram.strides[0] != d * gram.itemsize || gram.strides[1] != gram.itemsize) {
    throw py::value_error("gram: expected a contiguous float32 or float64 (d, d) buffer");
  }
  py::gil_scoped_release release;
  for (int64_t k = 0; k < K; ++k) {
    const double na = state_counts[k], nb = counts[k];
    if (nb == 0) continue;
    const double total = na + nb, pair = na * nb / total, fraction = nb / total;
    double* mu = state_means + k * d;
    const double* nu = means + k * d;
    double distance_sq = 0.0;
#pragma omp simd reduction(+ : distance_sq)
    for (int64_t j = 0; j < d; ++j) {
      const double delta = nu[j] - mu[j];
      distance_sq += delta * delta;
      mu[j] += delta * fraction;
    }
    state_class_sq[k] += class_sq[k] + pair * distance_sq;
    state_counts[k] = total;
  }
  if (gram64) add_gram(scatter, static_cast<const double*>(gram.ptr), d * d);
  else add_gram(scatter, static_cast<const float*>(gram.ptr), d * d);
}

}  // namespace

void register_ncstats(py::module_& m) {
  m.def("ncstats_batch", &ncstats_batch, py::arg("features"), py::arg("target"), py::arg("dtype"),
        py::arg("state_counts"), py::arg("state_means"), py::arg("counts"), py::arg("means"), py::arg("centred"),
        py::arg("correction"), py::arg("class_sq"), py::arg("num_threads"),
        "Per-class counts and float64 means of a batch, its centred rows followed by Chan's correction rows R, "
        "and the per-class sums of squared distances to the mean; returns the sign of R^T R in the scatter.");
  m.def("ncstats_fold", &ncstats_fold, py::arg("state_counts"), py::arg("state_means"), py::arg("state_class_sq"),
        py::arg("state_scatter"), py::arg("counts"), py::arg("means"), py::arg("class_sq"), py::arg("gram"),
        "Chan's merge of a batch (counts, means, class_sq, Gram with correction) into the float64 state.");
}

}  // namespace ncfast
