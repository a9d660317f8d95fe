// Transpositions between a tile of short rows and its class-major block, 16 rows × 16 classes
// at a time through AVX-512 registers (four rounds of lane shuffles). One element at a time
// each logit costs a load and a store that the core issues one or two a cycle; in registers a
// 16 × 16 block costs 16 loads, 64 shuffles and 16 stores. Pure data movement: the block holds
// the same bits either way. Without AVX-512 the functions do nothing and return 0.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.h"

namespace ncfast {

#ifdef NCFAST_AVX512
namespace avx512 {

// 16 consecutive elements as fp32.
NCFAST_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
NCFAST_AVX512 inline __m512 load16(const bf16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
NCFAST_AVX512 inline __m512 load16(const f16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// r[i][j] becomes r[j][i].
NCFAST_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // pairs of rows interleaved by element
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // then by pairs of elements
    for (int j = 0; j < 2; ++j) {
      const __m512d a = _mm512_castps_pd(t[i + j]), b = _mm512_castps_pd(t[i + j + 2]);
      r[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
  for (int base = 0; base < 16; base += 8) {  // then by 128-bit lanes
    for (int j = 0; j < 4; ++j) {
      t[base + j] = _mm512_shuffle_f32x4(r[base + j], r[base + j + 4], 0x88);
      t[base + j + 4] = _mm512_shuffle_f32x4(r[base + j], r[base + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

// The entry points are calls (two per tile of 32 rows): inlined into the release build's
// AVX-512 clone of the tile loop they made its rows of 2 classes 10 % slower.
#define NCFAST_AVX512_CALL NCFAST_AVX512 __attribute__((noinline))

// Rows of at least 16 classes: blocks of 16 classes, the last one ending at K (it overlaps the
// one before where 16 does not divide K, rewriting the same values).
NCFAST_AVX512 inline int64_t last_block_start(int64_t k0, int64_t K) { return k0 + 16 <= K ? k0 : K - 16; }

template <typename T>
NCFAST_AVX512_CALL int64_t rows_to_classes(const T* z, int64_t row_stride, int64_t K, int64_t P, float* zt) {
  for (int64_t p0 = 0; p0 < P; p0 += 16) {
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int64_t k = last_block_start(k0, K);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = load16(z + (p0 + i) * row_stride + k);
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(zt + (k + i) * P + p0, r[i]);
    }
  }
  return K;
}

NCFAST_AVX512_CALL inline int64_t classes_to_rows(const float* block, int64_t P, int64_t K, float* rows) {
  if (K >= 16) {
    for (int64_t p0 = 0; p0 < P; p0 += 16) {
      for (int64_t k0 = 0; k0 < K; k0 += 16) {
        const int64_t k = last_block_start(k0, K);
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(block + (k + i) * P + p0);
        transpose16(r);
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(rows + (p0 + i) * K + k, r[i]);
      }
    }
    return K;
  }
  // Rows shorter than 16, padded with zeros in registers: each row's store runs 16 - K elements
  // into the rows after it, which their own stores rewrite; the rows whose store would run past
  // the last one are stored under a mask.
  for (int64_t p0 = 0; p0 < P; p0 += 16) {
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = i < K ? _mm512_loadu_ps(block + i * P + p0) : _mm512_setzero_ps();
    transpose16(r);
    for (int i = 0; i < 16; ++i) {
      if ((p0 + i) * K + 16 <= P * K) {
        _mm512_storeu_ps(rows + (p0 + i) * K, r[i]);
      } else {
        _mm512_mask_storeu_ps(rows + (p0 + i) * K, static_cast<__mmask16>((1u << K) - 1), r[i]);
      }
    }
  }
  return K;
}

}  // namespace avx512
#endif

// Rows shorter than these go element by element, as fast or faster there. Measured, one thread,
// the fraction of the time through registers: padded rows in, (1000000, 2) 1.4, (3200000, 10)
// 1.05; back, (2000000, 8) 0.87, (4000000, 4) 0.99, (1000000, 2) 1.16.
constexpr int64_t kMinClassesIn = 16, kMinClassesBack = 8;

// zt[k·P + p] = z[p·row_stride + k] (as fp32) for p < P (a multiple of 16) and k below the
// returned count: K for rows of kMinClassesIn classes or more on AVX-512, else 0 (the caller's).
template <typename T>
inline int64_t rows_to_classes(const T* z, int64_t row_stride, int64_t K, int64_t P, float* zt) {
#ifdef NCFAST_AVX512
  if constexpr (!std::is_same_v<T, double>) {
    if (K >= kMinClassesIn && kHasAvx512) return avx512::rows_to_classes(z, row_stride, K, P, zt);
  }
#endif
  return 0;
}

// The way back: rows[p·K + k] = block[k·P + p] for p < P and k below the returned count (K for
// rows of kMinClassesBack classes or more on AVX-512, else 0: the caller's loop).
inline int64_t classes_to_rows(const float* block, int64_t P, int64_t K, float* rows) {
#ifdef NCFAST_AVX512
  if (K >= kMinClassesBack && kHasAvx512) return avx512::classes_to_rows(block, P, K, rows);
#endif
  return 0;
}

}  // namespace ncfast
