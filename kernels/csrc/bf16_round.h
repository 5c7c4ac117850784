// fp32 to bf16 as c10 rounds it (at::BFloat16: nearest even, NaN to 0x7fc0), 16 floats at a time,
// for the kernels that round their inputs (linear.cpp's dot products, amx_bf16.cpp's tiles,
// panel.cpp's bf16 pairs). The CPU's own conversion treats denormal inputs as zero, which c10 does not.
#pragma once

#include <immintrin.h>

#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
// GCC 12's AVX-512 shift intrinsics read an intentionally undefined register (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace wizard {

inline __m256i round_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0)));
}

// `n` fp32 inputs rounded to bf16.
inline void narrow_to_bf16(const float* x, int64_t n, uint16_t* y) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), round_to_bf16(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm256_mask_storeu_epi16(y + i, mask, round_to_bf16(_mm512_maskz_loadu_ps(mask, x + i)));
  }
}

}  // namespace wizard
#pragma GCC diagnostic pop
#pragma GCC pop_options
