// Int8 weights in blocks of 32 (llama.cpp's q8_0, with fp32 scales) and `x @ w^T + b` over them for
// inference on CPU. A weight [out, in] is stored as int8 values [out, padded] (in
// rounded up to a multiple of 32, zeros after `in`) and fp32 scales [out, padded / 32]: per block,
// scale = max|w| / 127 and q = round(w / scale) (ties to even; every q is in [-127, 127]).
//
// The kernel quantizes each activation row the same way, per block, and computes every output as
// the sum over blocks of (int32 block dot) * (weight scale * activation scale). The fp32 part runs in
// one order for every kernel, every row count and every thread split:
//   - lane l (0..7) of a block's dot is the sum of its products 4l..4l+3 (exact, in int32);
//   - 16 fp32 accumulators: lanes 0..7 take the even blocks, lanes 8..15 the odd blocks, each by
//     fma(float(lane), weight scale * activation scale, accumulator), block after block;
//   - then c[l] = acc[l] + acc[l + 8], t[l] = c[l] + c[l + 4], u[l] = t[l] + t[l + 2], sum u[0] + u[1].
// So a row gives the same bits alone or with 15 others, and the AVX-512 VNNI, AVX2 and scalar
// kernels give the same bits as each other.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "guard.h"
#include "parallel.h"

// GCC 12's AVX-512 reduction intrinsics read an intentionally undefined register (a false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

constexpr int64_t kBlock = 32;
// How far ahead of the rows being read the kernels prefetch the weight: the hardware prefetchers
// lose track of several interleaved short rows, and the weight comes from memory (measured best
// between 8 and 12 KiB on a Zen 5 core).
constexpr int64_t kPrefetchBytes = 12 * 1024;

// A quantized weight as the kernels read it.
struct Weights {
  const int8_t* values;  // [out, padded]
  const float* scales;   // [out, blocks]
  const float* bias;     // [out], or null
  int64_t padded, blocks, out;
};

// The activation rows, quantized once per call. Each kernel lays them out as records of 96 or 192
// bytes, ordered by block (or block pair), then row: the rows a kernel reads together sit side by
// side, one pointer away.
struct Activations {
  int64_t rows;
  uint8_t* data;  // kRecordBytes per block and row (2 * 96 bytes per block pair and row for VNNI)
};
constexpr int64_t kRecordBytes = 96;

// One block of n <= 32 values (the rest of the 32 read as zeros) into `q` (32 bytes) and its scale:
// max|v| / 127, and q = round-half-even(v / scale) — at most 127 in magnitude, since the rounded
// scale is within an ulp of max|v| / 127. A zero scale gives zeros. A block holding NaN or an
// infinity gets zeros and a NaN scale, so every output it enters is NaN. This is the definition the
// vector versions below reproduce bit for bit.
float quantize_block_ref(const float* v, int64_t n, int8_t* q) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < n; i++) {
    finite = finite && std::isfinite(v[i]);
    amax = std::max(amax, std::fabs(v[i]));
  }
  std::memset(q, 0, kBlock);
  if (!finite) return std::numeric_limits<float>::quiet_NaN();
  const float d = amax / 127.0f;
  if (d == 0.0f) return 0.0f;
  for (int64_t i = 0; i < n; i++) q[i] = static_cast<int8_t>(std::nearbyint(v[i] / d));
  return d;
}

// The last steps of the fixed order (see the top of the file), on the 16 accumulators.
float fold(const float* acc, const float* bias, int64_t j) {
  float c[8], t[4];
  for (int l = 0; l < 8; l++) c[l] = acc[l] + acc[l + 8];
  for (int l = 0; l < 4; l++) t[l] = c[l] + c[l + 4];
  const float sum = (t[0] + t[2]) + (t[1] + t[3]);
  return bias ? sum + bias[j] : sum;
}

// Portable: any x86-64 CPU. Slow (tens of times slower than AVX2), but in the same order as the
// vector kernels.
namespace scalar {

// A record per block and row: the 32 values, then the scale.
inline uint8_t* record(const Activations& a, int64_t b, int64_t r) { return a.data + (b * a.rows + r) * kRecordBytes; }

void prepare(const float* x, int64_t in, int64_t blocks, const Activations& a) {
  for (int64_t r = 0; r < a.rows; r++)
    for (int64_t b = 0; b < blocks; b++) {
      uint8_t* rec = record(a, b, r);
      const float d = quantize_block_ref(x + r * in + b * kBlock, std::min(kBlock, in - b * kBlock),
                                         reinterpret_cast<int8_t*>(rec));
      std::memcpy(rec + 32, &d, sizeof d);
    }
}

template <int R, int J>
inline void dots(const Activations& a, int64_t r, const Weights& w, float* y, int64_t j) {
  static_assert(R == 1 && J == 1, "the scalar kernel takes one row at a time");
  const int8_t* v = w.values + j * w.padded;
  const float* ws = w.scales + j * w.blocks;
  float acc[16] = {};
  for (int64_t b = 0; b < w.blocks; b++) {
    const uint8_t* rec = record(a, b, r);
    const int8_t* q = reinterpret_cast<const int8_t*>(rec);
    float xs;
    std::memcpy(&xs, rec + 32, sizeof xs);
    const float s = ws[b] * xs;
    float* lanes = acc + 8 * (b & 1);
    for (int l = 0; l < 8; l++) {
      int32_t p = 0;
      for (int k = 0; k < 4; k++) p += int32_t{q[4 * l + k]} * int32_t{v[b * kBlock + 4 * l + k]};
      lanes[l] = std::fma(static_cast<float>(p), s, lanes[l]);
    }
  }
  y[r * w.out + j] = fold(acc, w.bias, j);
}

#include "int8_kernel.h"

void rows_times_weight(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end) {
  rows_times_weight_by<1, 1>(a, w, y, begin, end);
}
}  // namespace scalar

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

// fold() on c = even + odd accumulators, in registers.
inline float fold(__m256 c, const float* bias, int64_t j) {
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  const float sum = _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  return bias ? sum + bias[j] : sum;
}

inline __m256 load_first(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  if (n <= 0) return _mm256_setzero_ps();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane));
}

// quantize_block_ref, eight lanes at a time.
inline float quantize_block(const float* x, int64_t n, int8_t* q) {
  __m256 v[4];
  for (int k = 0; k < 4; k++) v[k] = load_first(x + 8 * k, n - 8 * k);
  const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 amax = _mm256_setzero_ps();
  int bad = 0;
  for (int k = 0; k < 4; k++) {
    const __m256 a = _mm256_andnot_ps(sign, v[k]);
    bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, inf, _CMP_NLT_UQ));
    amax = _mm256_max_ps(amax, a);
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_setzero_si256());
  if (bad) return std::numeric_limits<float>::quiet_NaN();
  const float d = _mm_cvtss_f32(m) / 127.0f;
  if (d == 0.0f) return 0.0f;
  const __m256 vd = _mm256_set1_ps(d);
  __m256i i0 = _mm256_cvtps_epi32(_mm256_div_ps(v[0], vd)), i1 = _mm256_cvtps_epi32(_mm256_div_ps(v[1], vd));
  __m256i i2 = _mm256_cvtps_epi32(_mm256_div_ps(v[2], vd)), i3 = _mm256_cvtps_epi32(_mm256_div_ps(v[3], vd));
  // The packs work within 128-bit halves; the permutation puts the four-byte groups back in order.
  i0 = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), i0);
  return d;
}

// A record per block and row: the 32 values, their magnitudes, the scale 8 times.
inline uint8_t* record(const Activations& a, int64_t b, int64_t r) { return a.data + (b * a.rows + r) * kRecordBytes; }

void prepare(const float* x, int64_t in, int64_t blocks, const Activations& a) {
  for (int64_t r = 0; r < a.rows; r++)
    for (int64_t b = 0; b < blocks; b++) {
      uint8_t* rec = record(a, b, r);
      const float d =
          quantize_block(x + r * in + b * kBlock, std::min(kBlock, in - b * kBlock), reinterpret_cast<int8_t*>(rec));
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rec + 32), _mm256_sign_epi8(q, q));
      _mm256_storeu_ps(reinterpret_cast<float*>(rec + 64), _mm256_set1_ps(d));
    }
}

// R activation rows times J weight rows. The sign trick: maddubs multiplies unsigned by signed
// bytes, so |x| times w with x's sign (|products| <= 127 * 127, no 16-bit pair saturates), and madd
// sums the pairs into the eight four-product lanes.
template <int R, int J>
inline void dots(const Activations& a, int64_t r0, const Weights& w, float* y, int64_t j) {
  __m256 even[R][J], odd[R][J];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < J; c++) even[r][c] = odd[r][c] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* values = w.values + j * w.padded;
  const float* scales = w.scales + j * w.blocks;
  const int64_t record_stride = a.rows * kRecordBytes;
  const uint8_t* rec = record(a, 0, r0);
  auto block = [&](int64_t b, __m256(&acc)[R][J]) {
    for (int c = 0; c < J; c++) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + c * w.padded + b * kBlock));
      const __m256 wscale = _mm256_broadcast_ss(scales + c * w.blocks + b);
      for (int r = 0; r < R; r++) {
        const uint8_t* x = rec + r * kRecordBytes;
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
        const __m256i mag = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32));
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(wv, q)), ones);
        const __m256 s = _mm256_mul_ps(wscale, _mm256_loadu_ps(reinterpret_cast<const float*>(x + 64)));
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r][c]);
      }
    }
    rec += record_stride;
  };
  const char* scales_ahead = reinterpret_cast<const char*>(scales) + kPrefetchBytes / 8;
  for (int64_t i = 0; i < J * w.blocks * 4; i += 64) _mm_prefetch(scales_ahead + i, _MM_HINT_T0);
  int64_t b = 0;
  for (; b + 2 <= w.blocks; b += 2) {
    for (int c = 0; c < J; c++)
      _mm_prefetch(reinterpret_cast<const char*>(values + c * w.padded + b * kBlock) + kPrefetchBytes, _MM_HINT_T0);
    block(b, even);
    block(b + 1, odd);
  }
  if (b < w.blocks) block(b, even);
  for (int r = 0; r < R; r++)
    for (int c = 0; c < J; c++) y[(r0 + r) * w.out + j + c] = fold(_mm256_add_ps(even[r][c], odd[r][c]), w.bias, j + c);
}

#include "int8_kernel.h"

// 2 * R * J accumulators of 16 registers: one row meets four weight rows at once, more rows go four
// at a time against one weight row (the fastest of the shapes tried on a Zen 5 core).
void rows_times_weight(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end) {
  if (a.rows == 1)
    rows_times_weight_by<1, 4>(a, w, y, begin, end);
  else
    rows_times_weight_by<4, 1>(a, w, y, begin, end);
}
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vnni,avx2,fma")
namespace vnni {

// quantize_block_ref, sixteen lanes at a time.
inline float quantize_block(const float* x, int64_t n, int8_t* q) {
  const __mmask16 m0 = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
  const __mmask16 m1 = n >= 32 ? 0xFFFF : n > 16 ? static_cast<__mmask16>((1u << (n - 16)) - 1) : 0;
  const __m512 v0 = _mm512_maskz_loadu_ps(m0, x), v1 = _mm512_maskz_loadu_ps(m1, x + 16);
  const __m512 a0 = _mm512_abs_ps(v0), a1 = _mm512_abs_ps(v1);
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  const bool bad = (_mm512_cmp_ps_mask(a0, inf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(a1, inf, _CMP_NLT_UQ)) != 0;
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_setzero_si256());
  if (bad) return std::numeric_limits<float>::quiet_NaN();
  const float d = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1)) / 127.0f;
  if (d == 0.0f) return 0.0f;
  const __m512 vd = _mm512_set1_ps(d);
  const __m128i q0 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(v0, vd)));
  const __m128i q1 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_div_ps(v1, vd)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_set_m128i(q1, q0));
  return d;
}

// A record per block pair and row: the 64 values (the even block in the low 32 bytes, lanes 0..7;
// the odd one, or zeros, in the high), the 16 lane offsets, the 16 lane scales.
constexpr int64_t kPairBytes = 2 * kRecordBytes;
inline uint8_t* record(const Activations& a, int64_t i, int64_t r) { return a.data + (i * a.rows + r) * kPairBytes; }

void prepare(const float* x, int64_t in, int64_t blocks, const Activations& a) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t r = 0; r < a.rows; r++)
    for (int64_t i = 0; 2 * i < blocks; i++) {
      uint8_t* rec = record(a, i, r);
      for (int64_t h = 0; h < 2; h++) {
        const int64_t b = 2 * i + h;
        int8_t* q = reinterpret_cast<int8_t*>(rec + 32 * h);
        const float d = b < blocks ? quantize_block(x + r * in + b * kBlock, std::min(kBlock, in - b * kBlock), q)
                                   : (std::memset(q, 0, kBlock), 0.0f);
        _mm256_storeu_ps(reinterpret_cast<float*>(rec + 128 + 32 * h), _mm256_set1_ps(d));
      }
      const __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, _mm512_loadu_si512(rec));
      _mm512_storeu_si512(rec + 64, _mm512_sub_epi32(_mm512_setzero_si512(), sum));
    }
}

// R activation rows times J weight rows, a block pair at a time. dpbusd multiplies unsigned by
// signed bytes: the weight flipped to w + 128 (unsigned) times x, plus -128 * sum(x) (precomputed
// per activation lane), is the exact dot w . x.
template <int R, int J>
inline void dots(const Activations& a, int64_t r0, const Weights& w, float* y, int64_t j) {
  __m512 acc[R][J];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < J; c++) acc[r][c] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const int8_t* values = w.values + j * w.padded;
  const float* scales = w.scales + j * w.blocks;
  const int64_t record_stride = a.rows * kPairBytes;
  const uint8_t* rec = record(a, 0, r0);
  auto pair = [&](const __m512i(&wu)[J], const __m512(&wscale)[J]) {
    for (int r = 0; r < R; r++) {
      const uint8_t* x = rec + r * kPairBytes;
      const __m512i q = _mm512_loadu_si512(x);
      const __m512i offset = _mm512_loadu_si512(x + 64);
      const __m512 xscale = _mm512_loadu_ps(reinterpret_cast<const float*>(x + 128));
      for (int c = 0; c < J; c++) {
        const __m512i p = _mm512_dpbusd_epi32(offset, wu[c], q);
        acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(wscale[c], xscale), acc[r][c]);
      }
    }
    rec += record_stride;
  };
  const char* scales_ahead = reinterpret_cast<const char*>(scales) + kPrefetchBytes / 8;
  for (int64_t b = 0; b < J * w.blocks * 4; b += 64) _mm_prefetch(scales_ahead + b, _MM_HINT_T0);
  const int64_t full = w.blocks / 2;
  for (int64_t i = 0; i < full; i++) {
    __m512i wu[J];
    __m512 wscale[J];
    for (int c = 0; c < J; c++) {
      const int8_t* v = values + c * w.padded + 64 * i;
      _mm_prefetch(reinterpret_cast<const char*>(v) + kPrefetchBytes, _MM_HINT_T0);
      wu[c] = _mm512_xor_si512(_mm512_loadu_si512(v), flip);
      const __m128i two = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scales + c * w.blocks + 2 * i));
      wscale[c] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_castsi128_ps(two)));
    }
    pair(wu, wscale);
  }
  if (w.blocks % 2) {
    // The last block alone: the high half meets zero activations and a zero scale, and adds 0.
    __m512i wu[J];
    __m512 wscale[J];
    for (int c = 0; c < J; c++) {
      const __m256i last = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + c * w.padded + 64 * full));
      wu[c] = _mm512_xor_si512(_mm512_zextsi256_si512(last), flip);
      wscale[c] = _mm512_zextps256_ps512(_mm256_set1_ps(scales[c * w.blocks + 2 * full]));
    }
    pair(wu, wscale);
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < J; c++) {
      const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][c]), 1));
      y[(r0 + r) * w.out + j + c] = avx2::fold(_mm256_add_ps(_mm512_castps512_ps256(acc[r][c]), high), w.bias, j + c);
    }
}

#include "int8_kernel.h"

// Four rows times four weight rows: 16 accumulators, 8 weight registers and 3 of activations of 32.
void rows_times_weight(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end) {
  rows_times_weight_by<4, 4>(a, w, y, begin, end);
}
}  // namespace vnni
#pragma GCC pop_options

struct Kernel {
  void (*prepare)(const float* x, int64_t in, int64_t blocks, const Activations& a);
  void (*rows_times_weight)(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end);
};

constexpr Kernel kScalar{scalar::prepare, scalar::rows_times_weight};
constexpr Kernel kAvx2{avx2::prepare, avx2::rows_times_weight};
constexpr Kernel kVnni{vnni::prepare, vnni::rows_times_weight};

bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool has_vnni() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vnni");
}

// The kernel for `isa` (0: the widest this CPU runs, 1: AVX2, 2: scalar), or none.
const Kernel* kernel_for(int isa) {
  switch (isa) {
    case 0: return has_vnni() ? &kVnni : has_avx2() ? &kAvx2 : &kScalar;
    case 1: return has_avx2() ? &kAvx2 : nullptr;
    case 2: return &kScalar;
    default: return nullptr;
  }
}

std::string describe(const at::Tensor& t) {
  std::string sizes;
  for (int64_t s : t.sizes()) sizes += (sizes.empty() ? "" : ", ") + std::to_string(s);
  return std::string(c10::toString(t.scalar_type())) + " [" + sizes + "] on " + t.device().str();
}

// The layout the kernels index by (the Rust side validates the parts when they are made; this guards
// against tensors changed since, e.g. through a shallow clone).
void check_layout(const at::Tensor& values, const at::Tensor& scales, int64_t in) {
  if (!values.device().is_cpu() || values.scalar_type() != at::kChar || values.dim() != 2 || !values.is_contiguous())
    throw std::invalid_argument("int8 weight: values must be a contiguous int8 CPU matrix, got " + describe(values));
  if (!scales.device().is_cpu() || scales.scalar_type() != at::kFloat || scales.dim() != 2 || !scales.is_contiguous())
    throw std::invalid_argument("int8 weight: scales must be a contiguous float CPU matrix, got " + describe(scales));
  const int64_t padded = values.size(1);
  if (in < 0 || padded != (in + kBlock - 1) / kBlock * kBlock)
    throw std::invalid_argument("int8 weight: values " + describe(values) + " do not hold " + std::to_string(in) +
                                " input features padded to a multiple of 32");
  if (scales.size(0) != values.size(0) || scales.size(1) != padded / kBlock)
    throw std::invalid_argument("int8 weight: scales " + describe(scales) + " do not match values " + describe(values));
}

at::Tensor dequantize(const at::Tensor& values, const at::Tensor& scales, int64_t in) {
  const int64_t out = values.size(0), blocks = scales.size(1);
  return (values.to(at::kFloat).view({out, blocks, kBlock}) * scales.unsqueeze(-1))
      .view({out, blocks * kBlock})
      .narrow(1, 0, in)
      .contiguous();
}

bool kernel_applies(const Kernel* kernel, const at::Tensor& x, int64_t in, int64_t out,
                    const c10::optional<at::Tensor>& bias) {
  auto plain = [](const at::Tensor& t) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided;
  };
  const bool needs_grad = at::GradMode::is_enabled() && (x.requires_grad() || (bias && bias->requires_grad()));
  // Under CPU autocast at::linear computes in the autocast dtype; so must every linear.
  return kernel && !needs_grad && !at::autocast::is_autocast_enabled(at::kCPU) && plain(x) && x.dim() >= 1 &&
         in > 0 && x.size(-1) == in &&
         (!bias || (plain(*bias) && bias->is_contiguous() && bias->dim() == 1 && bias->size(0) == out));
}

}  // namespace

extern "C" {

// Which kernel the widest choice runs on this CPU: 2 AVX-512 VNNI, 1 AVX2, 0 scalar.
int wizard_int8_kernel_isa() {
  const Kernel* widest = kernel_for(0);
  return widest == &kVnni ? 2 : widest == &kAvx2 ? 1 : 0;
}

// Whether this CPU runs the kernel for `isa` (as in wizard_int8_linear).
int wizard_int8_kernel_available(int isa) { return kernel_for(isa) != nullptr; }

// `*values`, `*scales` = new tch tensors holding the blocks of `weight`, a contiguous fp32 CPU
// matrix of finite values.
int wizard_int8_quantize(void* weight_handle, void** values_out, void** scales_out) {
  return wizard::guarded([&] {
    const auto& w = *static_cast<at::Tensor*>(weight_handle);
    if (!w.device().is_cpu() || w.scalar_type() != at::kFloat || w.dim() != 2 || !w.is_contiguous())
      throw std::invalid_argument("int8 quantize: expected a contiguous float CPU matrix, got " + describe(w));
    const int64_t out = w.size(0), in = w.size(1), blocks = (in + kBlock - 1) / kBlock;
    auto values = at::empty({out, blocks * kBlock}, at::kChar);
    auto scales = at::empty({out, blocks}, at::kFloat);
    const float* wp = w.data_ptr<float>();
    int8_t* vp = values.data_ptr<int8_t>();
    float* sp = scales.data_ptr<float>();
    at::parallel_for(0, out, 64, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; j++)
        for (int64_t b = 0; b < blocks; b++) {
          const float d = quantize_block_ref(wp + j * in + b * kBlock, std::min(kBlock, in - b * kBlock),
                                             vp + j * blocks * kBlock + b * kBlock);
          if (std::isnan(d)) throw std::invalid_argument("int8 quantize: the weight holds NaN or infinite values");
          sp[j * blocks + b] = d;
        }
    });
    *values_out = new at::Tensor(std::move(values));
    *scales_out = new at::Tensor(std::move(scales));
  });
}

// `*result` = a new tch tensor: the fp32 [out, in] weight the blocks stand for.
int wizard_int8_dequantize(void* values_handle, void* scales_handle, int64_t in, void** result) {
  return wizard::guarded([&] {
    const auto& values = *static_cast<at::Tensor*>(values_handle);
    const auto& scales = *static_cast<at::Tensor*>(scales_handle);
    check_layout(values, scales, in);
    *result = new at::Tensor(dequantize(values, scales, in));
  });
}

// `*result` = a new tch tensor holding x @ dequantize(w)^T + bias (bias may be null): the kernel for
// `isa` (0: the widest this CPU runs, 1: AVX2, 2: scalar) for fp32 CPU rows that need no gradient,
// outside autocast (any count: decode, a batch, verification, prefill); otherwise the weight
// dequantized and at::linear.
int wizard_int8_linear(void* x_handle, void* values_handle, void* scales_handle, int64_t in, void* bias_handle,
                       int isa, void** result) {
  return wizard::guarded([&] {
    const auto& x = *static_cast<at::Tensor*>(x_handle);
    const auto& values = *static_cast<at::Tensor*>(values_handle);
    const auto& scales = *static_cast<at::Tensor*>(scales_handle);
    c10::optional<at::Tensor> bias;
    if (bias_handle) bias = *static_cast<at::Tensor*>(bias_handle);
    check_layout(values, scales, in);
    const int64_t out = values.size(0);
    const Kernel* kernel = kernel_for(isa);
    if (!kernel_applies(kernel, x, in, out, bias)) {
      *result = new at::Tensor(at::linear(x, dequantize(values, scales, in).to(x.device(), x.scalar_type()), bias));
      return;
    }
    const at::Tensor xc = x.contiguous();
    const int64_t rows = xc.numel() / in, blocks = values.size(1) / kBlock, pairs = (blocks + 1) / 2;
    auto sizes = x.sizes().vec();
    sizes.back() = out;
    auto y = at::empty(sizes, xc.options());
    if (rows > 0 && out > 0) {
      // Records for every block pair and row (the allocator aligns the buffer to 64 bytes).
      auto scratch = at::empty({rows * pairs * 2 * kRecordBytes}, at::kByte);
      const Activations a{rows, scratch.data_ptr<uint8_t>()};
      kernel->prepare(xc.data_ptr<float>(), in, blocks, a);
      const Weights w{values.data_ptr<int8_t>(), scales.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
                      values.size(1), blocks, out};
      float* yp = y.data_ptr<float>();
      // About 256K products per task, as many weight bytes as the fp32 kernel's 64K per task: small
      // layers stay on one thread.
      const int64_t grain = std::max<int64_t>(16, 262144 / (in * rows));
      wizard::balanced_for(out, grain,
                           [&](int64_t begin, int64_t end) { kernel->rows_times_weight(a, w, yp, begin, end); });
    }
    *result = new at::Tensor(std::move(y));
  });
}
}
