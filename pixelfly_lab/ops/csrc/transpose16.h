// 16 x 16 transposes for the compiled kernels (blocksparse_cpu.cpp, attention_cpu.cpp): AVX-512 where
// the compiler targets it, a scalar loop elsewhere.
//
// Why not at::vec::transpose_mxn: its vectorised versions are compiled only under CPU_CAPABILITY_AVX512
// (defined for ATen's own kernels; attention_cpu.cpp defines it too), and without it a source gets the
// generic one, a scalar loop with a switch on the size. In blocksparse_cpu.cpp that loop took ~80% of
// the sweep's own time (outside the micro-kernels) in a profile of the float32 backward (`perf record
// -e cpu-clock`, budget 0.1 of 1024 -> 4096, 4096 rows, one thread). One routine serves both files.
//
// The float32 transpose is the usual three stages (within 128-bit lanes: pairs of rows interleaved
// by 32 bits, then by 64 bits; then 128-bit lanes exchanged across the four groups of four rows);
// bfloat16 widens each row to 32-bit lanes, transposes those, and narrows back.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace pixelfly {

#if defined(__AVX512F__)
// v[j] = column j of the 16 x 16 matrix whose row i is v[i] (32-bit lanes)
[[gnu::always_inline]] inline void transpose16_in_registers(__m512 v[16]) {
  __m512 t[16];
  // per 128-bit lane L: t[i] = (r_i[4L], r_{i+1}[4L], r_i[4L+1], r_{i+1}[4L+1]), t[i + 1] the next two columns
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  __m512 u[16];   // u[g + k], lane L: column 4L + k of rows g .. g + 3
#pragma GCC unroll 4
  for (int g = 0; g < 16; g += 4) {
    const __m512d a = _mm512_castps_pd(t[g]), b = _mm512_castps_pd(t[g + 1]);
    const __m512d c = _mm512_castps_pd(t[g + 2]), d = _mm512_castps_pd(t[g + 3]);
    u[g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {   // column 4L + k = lane L of u[k], u[4 + k], u[8 + k], u[12 + k]
    const __m512 p0 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x44), p1 = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xEE);
    const __m512 q0 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x44);
    const __m512 q1 = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xEE);
    v[k] = _mm512_shuffle_f32x4(p0, q0, 0x88);
    v[4 + k] = _mm512_shuffle_f32x4(p0, q0, 0xDD);
    v[8 + k] = _mm512_shuffle_f32x4(p1, q1, 0x88);
    v[12 + k] = _mm512_shuffle_f32x4(p1, q1, 0xDD);
  }
}

inline __mmask16 first_lanes(int n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1); }
#endif

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols (both at most 16); T is float or a
// 16-bit type (bfloat16). Nothing else of dst is written.
template <typename T>
[[gnu::always_inline]] inline void transpose16(const T* src, int64_t lds, T* dst, int64_t ldd, int rows, int cols) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 2, "32- or 16-bit elements");
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  __m512 v[16];
  if (rows == 16 && cols == 16) {   // a whole tile: no masks, the loops unrolled (the arrays stay in registers)
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      if constexpr (sizeof(T) == 4)
        v[r] = _mm512_loadu_ps(src + r * lds);
      else
        v[r] = _mm512_castsi512_ps(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * lds))));
    }
    transpose16_in_registers(v);
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c) {
      if constexpr (sizeof(T) == 4)
        _mm512_storeu_ps(dst + c * ldd, v[c]);
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c * ldd),
                            _mm512_cvtepi32_epi16(_mm512_castps_si512(v[c])));
    }
    return;
  }
  const __mmask16 in = first_lanes(cols), out = first_lanes(rows);
  for (int r = 0; r < 16; ++r) {
    if (r >= rows) {
      v[r] = _mm512_setzero_ps();
    } else if constexpr (sizeof(T) == 4) {
      v[r] = _mm512_maskz_loadu_ps(in, src + r * lds);
    } else {
      v[r] = _mm512_castsi512_ps(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(in, src + r * lds)));
    }
  }
  transpose16_in_registers(v);
  for (int c = 0; c < cols; ++c) {
    if constexpr (sizeof(T) == 4)
      _mm512_mask_storeu_ps(dst + c * ldd, out, v[c]);
    else
      _mm256_mask_storeu_epi16(dst + c * ldd, out, _mm512_cvtepi32_epi16(_mm512_castps_si512(v[c])));
  }
#else
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
#endif
}

// dst (cols x rows, ld ldd) = src (rows x cols, ld lds) transposed, 16 x 16 at a time
template <typename T>
inline void transpose(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; r += 16)
    for (int64_t c = 0; c < cols; c += 16)
      transpose16(src + r * lds + c, lds, dst + c * ldd + r, ldd, static_cast<int>(std::min<int64_t>(16, rows - r)),
                  static_cast<int>(std::min<int64_t>(16, cols - c)));
}

}  // namespace pixelfly
