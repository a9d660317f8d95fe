// Shared plumbing for the CPU kernels: buffer views, element types, runtime ISA dispatch,
// threading. The kernels see plain pointers and sizes; nothing here knows torch.
#pragma once

#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

// AVX-512 code paths picked at run time by kHasAvx512: a function marked NCFAST_AVX512 can be
// inlined only into the AVX-512 clone of its caller; the other clones call it.
#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 flags the intrinsics' own undefined-vector placeholders as (maybe) uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define NCFAST_AVX512 __attribute__((target("avx512f")))
#endif

namespace py = pybind11;

namespace ncfast {

// One build runs everywhere: the hot loops are compiled three times (AVX-512, AVX2+FMA,
// baseline x86-64) and the loader picks the best clone for the running CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NCFAST_NO_CLONES)
#define NCFAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NCFAST_CLONES
#endif
#define NCFAST_INLINE inline __attribute__((always_inline))
// A lambda inlined into its caller, so that it is compiled for the caller's target clone (on
// its own it would be built for the baseline ISA).
#define NCFAST_INLINE_LAMBDA __attribute__((always_inline))

#ifdef NCFAST_AVX512
// Read once when the module loads (the checks run per tile or per cache line).
inline const bool kHasAvx512 = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f"));
#endif

// Element types the kernels read and write. bf16 travels as raw 16-bit words (numpy has no
// bfloat16), fp16 as _Float16.
struct bf16 {
  uint16_t bits;
};
using f16 = _Float16;

NCFAST_INLINE float to_float(bf16 v) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(v.bits) << 16);
}
NCFAST_INLINE float to_float(f16 v) { return static_cast<float>(v); }
NCFAST_INLINE float to_float(float v) { return v; }
NCFAST_INLINE double to_float(double v) { return v; }

// Accumulation type: fp32 for every 16/32-bit input, fp64 for fp64.
template <typename T>
struct acc_of {
  using type = float;
};
template <>
struct acc_of<double> {
  using type = double;
};

// Rounds an accumulator value to the element type T.
template <typename T>
NCFAST_INLINE T from_acc(typename acc_of<T>::type v) {
  return static_cast<T>(v);
}
template <>
NCFAST_INLINE bf16 from_acc<bf16>(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  // Round to nearest even; NaN stays a (quiet) NaN.
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  return bf16{static_cast<uint16_t>(v != v ? nan : rounded)};
}

// exp on the vector units for x ≤ 0 (every caller passes z - max or a difference of maxima):
// Cody-Waite range reduction x = n·ln2 + r, |r| ≤ ln2/2, and a degree-5 minimax polynomial
// (relative error ≤ 2e-7 in fp32), branch-free so that `#pragma omp simd` loops vectorise it.
// Arguments below -88 (-inf included) are clamped there, where 2^n is exactly 0: results
// below the smallest normal float flush to 0.
NCFAST_INLINE float vexp(float x) {
  const float xc = x < -88.0f ? -88.0f : x;  // a compare, not fmaxf: it vectorises
  // n = round(x / ln 2) by adding 1.5·2^23: n sits in the low mantissa bits of t.
  const float t = xc * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 8.31252709e-3f;
  p = p * r + 4.18901183e-2f;
  p = p * r + 1.66671142e-1f;
  p = p * r + 4.99992311e-1f;
  p = p * r + 1.0f;
  const float y = p * r + 1.0f;
  // 2^n from t's bits: (n + 127) << 23, the bits of 1.5·2^23 shift out.
  const float scale = __builtin_bit_cast(float, (__builtin_bit_cast(uint32_t, t) + 127u) << 23);
  return y * scale;
}
NCFAST_INLINE double vexp(double x) { return std::exp(x); }

// log on the vector units for x ≥ 0 (0 gives -inf, +inf gives +inf, NaN and x < 0 give NaN):
// x = 2^n·m with m in [√½, √2), log m from the Cephes single-precision polynomial in m - 1
// (relative error ≈ 1e-7); subnormal x are scaled by 2^23 first. Branch-free.
NCFAST_INLINE float vlog(float x) {
  const bool subnormal = x < 1.17549435e-38f;
  const float xs = subnormal ? x * 8388608.0f : x;
  const int32_t u = static_cast<int32_t>(__builtin_bit_cast(uint32_t, xs));
  // n such that m = xs / 2^n lies in [√½, √2): 0x3f3504f3 is the bits of √½.
  const int32_t n = (u - 0x3f3504f3) >> 23;
  const float m = __builtin_bit_cast(float, static_cast<uint32_t>(u - static_cast<int32_t>(static_cast<uint32_t>(n) << 23)));
  const float e = static_cast<float>(n) - (subnormal ? 23.0f : 0.0f);
  const float f = m - 1.0f, f2 = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float y = f2 * f * p + e * -2.12194440e-4f - 0.5f * f2;
  const float result = f + y + e * 0.693359375f;
  const float inf = __builtin_inff();
  return x > 0 ? (x < inf ? result : inf) : (x == 0 ? -inf : __builtin_nanf(""));
}
NCFAST_INLINE double vlog(double x) { return std::log(x); }

// e^x - 1 on the vector units for x ≤ 0, relative accuracy ≈ 2e-7 everywhere: a Taylor
// polynomial near 0 (where e^x - 1 would cancel), vexp(x) - 1 below -0.35 (≤ -0.29 there).
NCFAST_INLINE float vexpm1(float x) {
  float p = 1.0f / 40320;
  p = p * x + 1.0f / 5040;
  p = p * x + 1.0f / 720;
  p = p * x + 1.0f / 120;
  p = p * x + 1.0f / 24;
  p = p * x + 1.0f / 6;
  p = p * x + 0.5f;
  const float small = x + x * x * p;
  return x > -0.35f ? small : vexp(x) - 1.0f;
}
NCFAST_INLINE double vexpm1(double x) { return std::expm1(x); }

// x^g for x in [0, 1] and g ≥ 0 (0^0 = 1), on the vector units.
NCFAST_INLINE float vpow_unit(float x, float g) {
  const float positive = vexp(g * vlog(x > 0 ? x : 1.0f));
  return x > 0 ? positive : (g == 0 ? 1.0f : 0.0f);
}
NCFAST_INLINE double vpow_unit(double x, double g) { return std::pow(x, g); }

// tanh on the vector units: an odd polynomial near 0 (relative accuracy where 1 - 2/(e^{2x}+1)
// would cancel), 1 - 2/(e^{2|x|} + 1) elsewhere; branch-free.
NCFAST_INLINE float vtanh(float x) {
  const float ax = x < 0 ? -x : x;
  const float x2 = x * x;
  float p = -5.70498872745e-3f;
  p = p * x2 + 2.06390887954e-2f;
  p = p * x2 - 5.37397155531e-2f;
  p = p * x2 + 1.33314422036e-1f;
  p = p * x2 - 3.33332819422e-1f;
  const float small = x + x * x2 * p;
  // e^{-2|x|} keeps vexp's argument ≤ 0: tanh|x| = (1 - e)/(1 + e).
  const float e = vexp(-2.0f * ax);
  const float large = (1.0f - e) / (1.0f + e);
  return ax < 0.625f ? small : (x < 0 ? -large : large);
}
NCFAST_INLINE double vtanh(double x) { return std::tanh(x); }

// A strided 1-D or 2-D view of a Python buffer (a numpy array made from a tensor with
// `.numpy()`, zero-copy). Strides are in elements.
struct View {
  void* data = nullptr;
  int64_t rows = 0, cols = 1;
  int64_t row_stride = 0, col_stride = 1;
};

// Checks a buffer's rank and item size and returns its view; raises ValueError naming `name`.
View view_of(const py::buffer& buffer, const char* name, int ndim, size_t itemsize, bool writable);

// The number of threads a kernel may use, as the caller asked (torch.get_num_threads()).
inline int thread_count(int requested) { return requested > 0 ? requested : 1; }

// This thread's index in the enclosing parallel region (0 outside one).
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Splits [0, n) into `threads` contiguous ranges, one per OpenMP thread, and runs
// body(begin, end) on each. The split depends only on n and the thread count actually
// granted, and callers make each item's result independent of it (deterministic output).
template <typename Body>
void parallel_ranges(int64_t n, int threads, Body&& body) {
  if (threads <= 1) {  // no parallel region to start (a small call's fixed cost); the same split
    body(0, n);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    body(n * t / nt, n * (t + 1) / nt);
  }
}

void register_losses(py::module_& m);
void register_ncstats(py::module_& m);

}  // namespace ncfast
