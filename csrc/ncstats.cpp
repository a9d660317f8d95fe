// The CPU kernels of the streaming neural-collapse statistics.
//
// ncstats_batch: per-class counts and float64 means ν_k of a batch whose labels were
// compacted to the classes it holds (K' ≤ N rows of state, not K), and its rows centred on
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
// The rows are written times a power of two `scale` (exact): the caller picks it so that the
// float32 Gram neither overflows nor underflows whatever the features' magnitude.
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
  const double* counts;        // (K',) batch counts n^b (all > 0)
  const double* shrink;        // (K',) t_k
  const double* state_means;   // (K', d) running means μ_k of the batch's classes
  double* means;               // (K', d) batch means ν_k, rows contiguous
  C* centred;                  // (N, d)
  int64_t centred_stride;
  double scale;                // power of two applied to the centred rows
  double* block_sq;  // (blocks, K'): block b's share of Σ_{i∈k} ‖h_i − p_k‖²
  int64_t rows, dim, classes;
};

// Every pass walks the rows in order and, in each row, the thread's own column blocks
// [b0, b1): the batch streams through memory once per pass (a column strip per pass would
// touch every page of the batch once per block and thrash the TLB). Per-class squared
// distances are kept per 64-column block so that their sum does not depend on the split.
template <typename T, typename C>
NCFAST_INLINE void moments_blocks(const BatchArgs<T, C>& a, int64_t b0, int64_t b1) {
  const int64_t d = a.dim, K = a.classes, c0 = b0 * kColumnBlock, c1 = std::min(b1 * kColumnBlock, d);
  for (int64_t k = 0; k < K; ++k) std::fill(a.means + k * d + c0, a.means + k * d + c1, 0.0);
  for (int64_t b = b0; b < b1; ++b) std::fill(a.block_sq + b * K, a.block_sq + (b + 1) * K, 0.0);
  for (int64_t i = 0; i < a.rows; ++i) {  // class sums
    const T* x = a.features + i * a.features_stride;
    double* m = a.means + a.target[i * a.target_stride] * d;
#pragma omp simd
    for (int64_t j = c0; j < c1; ++j) m[j] += static_cast<double>(to_float(x[j]));
  }
  for (int64_t k = 0; k < K; ++k) {
    double* m = a.means + k * d;
    const double n = a.counts[k];
#pragma omp simd
    for (int64_t j = c0; j < c1; ++j) m[j] /= n;
  }
  for (int64_t i = 0; i < a.rows; ++i) {  // rows h_i − p_{y_i}, scaled, and their squared norms
    const int64_t y = a.target[i * a.target_stride];
    const T* x = a.features + i * a.features_stride;
    const double* m = a.means + y * d;
    const double* mu = a.state_means + y * d;
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
NCFAST_CLONES void moments_f32(const BatchArgs<float, float>& a, int64_t b, int64_t e) { moments_blocks(a, b, e); }
NCFAST_CLONES void moments_f64(const BatchArgs<double, double>& a, int64_t b, int64_t e) { moments_blocks(a, b, e); }
NCFAST_CLONES void moments_bf16(const BatchArgs<bf16, float>& a, int64_t b, int64_t e) { moments_blocks(a, b, e); }
NCFAST_CLONES void moments_f16(const BatchArgs<f16, float>& a, int64_t b, int64_t e) { moments_blocks(a, b, e); }

template <typename T, typename C>
void run_moments(const View& features, const View& target, const double* counts, const double* shrink,
                 const double* state_means, double* means, const View& centred, double scale, double* class_sq,
                 int64_t classes, int num_threads, void (*blocks_fn)(const BatchArgs<T, C>&, int64_t, int64_t)) {
  const int64_t blocks = (features.cols + kColumnBlock - 1) / kColumnBlock;
  std::vector<double> block_sq(static_cast<size_t>(blocks * classes));
  BatchArgs<T, C> a{static_cast<const T*>(features.data), features.row_stride,
                    static_cast<const int64_t*>(target.data), target.row_stride, counts, shrink, state_means, means,
                    static_cast<C*>(centred.data), centred.row_stride, scale, block_sq.data(),
                    features.rows, features.cols, classes};
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
}

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

// ncstats_batch(features, target, dtype, state_counts, state_means, counts, means, centred,
//               class_sq, scale, num_threads)
// features: (N, d) rows contiguous, float32/float64/bfloat16 (as int16)/float16; target: (N,)
// int64 compacted labels in [0, K'), every one present; state_counts (K',), state_means
// (K', d): the running state of those classes (read only). Writes the batch's counts (K,),
// means ν (K', d) and Σ_{i∈k}‖h_i − p_k‖² (K',) in float64, and scale·(h_i − p_{y_i}) (N, d)
// in float32 (float64 for float64 features). Raises ValueError for a label out of range.
void ncstats_batch(const py::buffer& features_buf, const py::buffer& target_buf, const std::string& dtype,
                   const py::buffer& state_counts_buf, const py::buffer& state_means_buf, const py::buffer& counts_buf,
                   const py::buffer& means_buf, const py::buffer& centred_buf, const py::buffer& class_sq_buf,
                   double scale, int num_threads) {
  const size_t itemsize = dtype == "float64" ? 8 : dtype == "float32" ? 4 : (dtype == "bfloat16" || dtype == "float16") ? 2 : 0;
  if (itemsize == 0) throw py::type_error("features: unsupported dtype " + dtype);
  View features = view_of(features_buf, "features", 2, itemsize, false);
  View target = view_of(target_buf, "target", 1, sizeof(int64_t), false);
  View counts_view = view_of(counts_buf, "counts", 1, sizeof(double), true);
  View centred = view_of(centred_buf, "centred", 2, dtype == "float64" ? 8 : 4, true);
  const int64_t N = features.rows, d = features.cols, K = counts_view.rows;
  if (K < 1) throw py::value_error("counts: expected at least one class");
  double* counts = state_of(counts_buf, "counts", 1, K, 1, true);
  double* means = state_of(means_buf, "means", 2, K, d, true);
  double* class_sq = state_of(class_sq_buf, "class_sq", 1, K, 1, true);
  const double* state_counts = state_of(state_counts_buf, "state_counts", 1, K, 1, false);
  const double* state_means = state_of(state_means_buf, "state_means", 2, K, d, false);
  if (target.rows != N) throw py::value_error("target: length differs from features' rows");
  if (centred.rows != N || centred.cols != d) throw py::value_error("centred: expected shape (N, d)");

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
  std::vector<double> shrink(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    if (counts[k] == 0) throw py::value_error("target: compacted class " + std::to_string(k) + " has no row");
    shrink[k] = std::sqrt(state_counts[k] / (state_counts[k] + counts[k]));
  }
  const double* t = shrink.data();
  if (dtype == "float32")
    run_moments<float, float>(features, target, counts, t, state_means, means, centred, scale, class_sq, K, num_threads,
                              moments_f32);
  else if (dtype == "float64")
    run_moments<double, double>(features, target, counts, t, state_means, means, centred, scale, class_sq, K,
                                num_threads, moments_f64);
  else if (dtype == "bfloat16")
    run_moments<bf16, float>(features, target, counts, t, state_means, means, centred, scale, class_sq, K, num_threads,
                             moments_bf16);
  else
    run_moments<f16, float>(features, target, counts, t, state_means, means, centred, scale, class_sq, K, num_threads,
                            moments_f16);
}

// One tile of the pairwise metrics over the rows k of one block and l of another:
// `cosines` (R, C) holds cos∠(u_k, u_l) = û_k·û_l of unit vectors; returns
//
//     Σ_kl |cos_kl + shift|                                   (max-angle, shift = 1/(K−1))
//     Σ_kl (v_k + v_l) / (2 ‖u_k − u_l‖²)                     (CDNV, only when `variances`)
//
// with ‖u_k − u_l‖² = ‖u_k‖² + ‖u_l‖² − 2‖u_k‖‖u_l‖cos_kl, over every pair, or every pair
// k ≠ l when the two blocks are the same (`diagonal`). Each row is summed in float64 in
// column order and the row sums in row order: the same result for any thread count.
template <typename G>
NCFAST_INLINE void tile_rows(const G* cosines, int64_t stride, int64_t cols, const double* norm_r, const double* norm_c,
                             const double* var_r, const double* var_c, double shift, bool diagonal, int64_t r0,
                             int64_t r1, double* abs_sums, double* cdnv_sums) {
  for (int64_t r = r0; r < r1; ++r) {
    const G* c = cosines + r * stride;
    const double nr = norm_r[r], nr2 = nr * nr;
    double abs_sum = 0.0, cdnv_sum = 0.0;
    if (var_r != nullptr) {
      const double vr = var_r[r];
#pragma omp simd reduction(+ : abs_sum, cdnv_sum)
      for (int64_t l = 0; l < cols; ++l) {
        const double cos = static_cast<double>(c[l]);
        const double distance_sq = nr2 + norm_c[l] * norm_c[l] - 2.0 * nr * norm_c[l] * cos;
        const bool keep = !diagonal || l != r;
        abs_sum += keep ? std::fabs(cos + shift) : 0.0;
        cdnv_sum += keep ? (vr + var_c[l]) / (2.0 * distance_sq) : 0.0;
      }
    } else {
#pragma omp simd reduction(+ : abs_sum)
      for (int64_t l = 0; l < cols; ++l) {
        const bool keep = !diagonal || l != r;
        abs_sum += keep ? std::fabs(static_cast<double>(c[l]) + shift) : 0.0;
      }
    }
    abs_sums[r] = abs_sum;
    cdnv_sums[r] = cdnv_sum;
  }
}

NCFAST_CLONES void tile_f32(const float* c, int64_t s, int64_t n, const double* a, const double* b, const double* va,
                            const double* vb, double shift, bool diag, int64_t r0, int64_t r1, double* o1, double* o2) {
  tile_rows(c, s, n, a, b, va, vb, shift, diag, r0, r1, o1, o2);
}
NCFAST_CLONES void tile_f64(const double* c, int64_t s, int64_t n, const double* a, const double* b, const double* va,
                            const double* vb, double shift, bool diag, int64_t r0, int64_t r1, double* o1, double* o2) {
  tile_rows(c, s, n, a, b, va, vb, shift, diag, r0, r1, o1, o2);
}

// ncstats_pairwise_tile(cosines, norms_rows, norms_cols, variances_rows, variances_cols,
//                       shift, diagonal, num_threads) -> (Σ|cos + shift|, Σ CDNV terms)
// cosines: (R, C) float32 or float64 with contiguous rows; norms (R,), (C,) float64;
// variances (R,), (C,) float64, or empty arrays for no CDNV.
py::tuple ncstats_pairwise_tile(const py::buffer& cosines_buf, const py::buffer& norms_r_buf,
                                const py::buffer& norms_c_buf, const py::buffer& var_r_buf, const py::buffer& var_c_buf,
                                double shift, bool diagonal, int num_threads) {
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
  std::vector<double> abs_sums(static_cast<size_t>(R)), cdnv_sums(static_cast<size_t>(R));
  {
    py::gil_scoped_release release;
    const int threads = static_cast<int>(std::min<int64_t>(thread_count(num_threads), std::max<int64_t>(1, R * C >> 20)));
    parallel_ranges(R, threads, [&](int64_t r0, int64_t r1) {
      if (info.itemsize == 4)
        tile_f32(static_cast<const float*>(cosines.data), cosines.row_stride, C, norm_r, norm_c, var_r, var_c, shift,
                 diagonal, r0, r1, abs_sums.data(), cdnv_sums.data());
      else
        tile_f64(static_cast<const double*>(cosines.data), cosines.row_stride, C, norm_r, norm_c, var_r, var_c, shift,
                 diagonal, r0, r1, abs_sums.data(), cdnv_sums.data());
    });
  }
  double abs_total = 0.0, cdnv_total = 0.0;
  for (int64_t r = 0; r < R; ++r) {
    abs_total += abs_sums[r];
    cdnv_total += cdnv_sums[r];
  }
  return py::make_tuple(abs_total, cdnv_total);
}

}  // namespace

void register_ncstats(py::module_& m) {
  m.def("ncstats_batch", &ncstats_batch, py::arg("features"), py::arg("target"), py::arg("dtype"),
        py::arg("state_counts"), py::arg("state_means"), py::arg("counts"), py::arg("means"), py::arg("centred"),
        py::arg("class_sq"), py::arg("scale"), py::arg("num_threads"),
        "Per-class counts and float64 means of a batch (labels compacted to its classes), its rows centred so that "
        "their Gram is the batch scatter plus Chan's correction, and the per-class sums of their squared norms.");
  m.def("ncstats_pairwise_tile", &ncstats_pairwise_tile, py::arg("cosines"), py::arg("norms_rows"),
        py::arg("norms_cols"), py::arg("variances_rows"), py::arg("variances_cols"), py::arg("shift"),
        py::arg("diagonal"), py::arg("num_threads"),
        "Sums of |cos + shift| and of the CDNV terms over one tile of pairwise cosines.");
}

}  // namespace ncfast
