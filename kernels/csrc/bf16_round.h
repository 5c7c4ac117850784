// fp32 to bf16 as c10 rounds it (at::BFloat16: nearest even, NaN to 0x7fc0), 16 floats at a time,
// for the kernels that round their inputs (linear.cpp's dot products, amx_bf16.cpp's tiles). The
// CPU's own conversion treats denormal inputs as zero, which c10 does not.
#pragma once

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
namespace wizard {

inline __m256i round_to_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc0)));
}

}  // namespace wizard
#pragma GCC pop_options
