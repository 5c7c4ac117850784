// Int8 weights in blocks of 32 (llama.cpp's q8_0, with fp32 scales) and `x @ w^T + b` over them for
// inference on CPU. The format users see (and files hold): values [out, padded] (in rounded up to a
// multiple of 32, zeros after `in`) and fp32 scales [out, padded / 32]; per block, scale = max|w| / 127
// and q = round(w / scale) (ties to even; every q is in [-127, 127]).
//
// The kernels read a packed copy instead (made once, when a weight is quantized or loaded): outputs in
// groups of 16 and, per group and block, one 576-byte record: the block's values of the 16 outputs as
// [8 quads][16 outputs][4 values], each plus 128 (unsigned bytes), then the 16 outputs' scales. One
// load holds four values of 16 outputs, which one VNNI (or AMX) step multiplies by four activation
// bytes, so a block's integer dot comes out whole for 16 outputs at once.
//
// Each activation row is quantized the same way per block, and every output is
//   y = 0; for each block b in order: y = fma(float(dot_b), weight scale_b * activation scale_b, y);
//   then y + bias,
// where dot_b, the block's integer dot, is exact (|dot_b| <= 32 * 127 * 127 < 2^24: the float is
// exact too). So a row gives the same bits alone or with others, whatever the thread split, and the
// AVX-512 VNNI, AVX2 and scalar kernels give the same bits as each other.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>

#include "cpu.h"
#include "dense.h"
#include "guard.h"
#include "parallel.h"

// GCC 12's AVX-512 reduction intrinsics read an intentionally undefined register (a false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kGroup = 16;                               // outputs per record
constexpr int64_t kQuads = kBlock / 4;                       // four-value steps per block
constexpr int64_t kQuadBytes = 4 * kGroup;                   // one quad of the 16 outputs
constexpr int64_t kRecord = kBlock * kGroup + 4 * kGroup;    // values, then scales: 576 bytes
// How far ahead of the records being read the kernels prefetch the weight: 12 KiB measured best on
// one Zen 5 core, where the hardware prefetchers lost track of interleaved streams, and 0 (no lead)
// faster on another AMD VM for a model of 81 MB; the load-time calibration (kernels::calibrate) times
// both and sets this.
std::atomic<int64_t> prefetch_bytes{12 * 1024};  // kernels::int8::PREFETCH_LEAD

int64_t groups_of(int64_t out) { return (out + kGroup - 1) / kGroup; }

// A packed weight as the kernels read it.
struct Weights {
  const uint8_t* packed;  // [groups][blocks] records
  const float* bias;      // [out], or null
  int64_t blocks, out;
  int64_t prefetch;       // bytes ahead of the records read
  const uint8_t* record(int64_t g, int64_t b) const { return packed + (g * blocks + b) * kRecord; }
};

// The activation rows, quantized once per call.
struct Activations {
  int64_t rows, blocks;
  int8_t* q;        // [rows][blocks * 32]
  int32_t* offset;  // [rows][blocks]: -128 * the block's sum (VNNI's unsigned weights add 128 * it)
  float* scale;     // [rows][blocks]
  const int8_t* values(int64_t r, int64_t b) const { return q + (r * blocks + b) * kBlock; }
  int64_t at(int64_t r, int64_t b) const { return r * blocks + b; }
};
// Bytes of quantized activations per row and block.
constexpr int64_t kActivationBytes = kBlock + 8;

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

// Quantizes every row's blocks with `quantize_block` (one of the versions below, all the same bits).
template <typename Quantize>
void prepare_with(Quantize quantize_block, const float* x, int64_t in, const Activations& a) {
  for (int64_t r = 0; r < a.rows; r++)
    for (int64_t b = 0; b < a.blocks; b++) {
      int8_t* q = a.q + a.at(r, b) * kBlock;
      a.scale[a.at(r, b)] = quantize_block(x + r * in + b * kBlock, std::min(kBlock, in - b * kBlock), q);
      int32_t sum = 0;
      for (int64_t k = 0; k < kBlock; k++) sum += q[k];
      a.offset[a.at(r, b)] = -128 * sum;
    }
}

// Output `col`'s value at position k of a record: the stored byte minus 128.
inline int32_t value_at(const uint8_t* record, int64_t col, int64_t k) {
  return int32_t{record[(k / 4) * kQuadBytes + col * 4 + k % 4]} - 128;
}
inline const float* scales_of(const uint8_t* record) {
  return reinterpret_cast<const float*>(record + kBlock * kGroup);
}

// Portable: any x86-64 CPU. Slow (tens of times slower than AVX2), but in the same order as the
// vector kernels.
namespace scalar {

void prepare(const float* x, int64_t in, const Activations& a) { prepare_with(quantize_block_ref, x, in, a); }

template <int R, int J>
inline void dots(const Activations& a, int64_t r, const Weights& w, float* y, int64_t g) {
  static_assert(R == 1 && J == 1, "the scalar kernel takes one row and one group at a time");
  float acc[kGroup] = {};
  for (int64_t b = 0; b < w.blocks; b++) {
    const uint8_t* rec = w.record(g, b);
    const int8_t* q = a.values(r, b);
    for (int64_t c = 0; c < kGroup; c++) {
      int32_t dot = 0;
      for (int64_t k = 0; k < kBlock; k++) dot += int32_t{q[k]} * value_at(rec, c, k);
      acc[c] = std::fma(static_cast<float>(dot), scales_of(rec)[c] * a.scale[a.at(r, b)], acc[c]);
    }
  }
  for (int64_t c = 0; c < kGroup && g * kGroup + c < w.out; c++) {
    const int64_t j = g * kGroup + c;
    y[r * w.out + j] = w.bias ? acc[c] + w.bias[j] : acc[c];
  }
}

#include "int8_kernel.h"

void rows_times_weight(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end) {
  rows_times_weight_by<1, 1>(a, w, y, begin, end);
}
}  // namespace scalar

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {

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

void prepare(const float* x, int64_t in, const Activations& a) { prepare_with(quantize_block, x, in, a); }

// R activation rows times one group of 16 outputs, as two halves of 8. The sign trick: maddubs
// multiplies unsigned by signed bytes, so |x| times w with x's sign (|products| <= 127 * 127, no
// 16-bit pair saturates), and madd sums the pairs into each output's four-product lane.
template <int R, int J>
inline void dots(const Activations& a, int64_t r0, const Weights& w, float* y, int64_t g) {
  static_assert(J == 1, "the AVX2 kernel takes one group at a time");
  __m256 acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < w.blocks; b++) {
    const uint8_t* rec = w.record(g, b);
    __m256i dot[R][2];
    for (int r = 0; r < R; r++) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
    for (int64_t k = 0; k < kQuads; k++) {
      const uint8_t* quad = rec + k * kQuadBytes;
      _mm_prefetch(reinterpret_cast<const char*>(quad) + w.prefetch, _MM_HINT_T0);
      const __m256i w0 = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(quad)), flip);
      const __m256i w1 = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(quad + 32)), flip);
      for (int r = 0; r < R; r++) {
        int32_t four;
        std::memcpy(&four, a.values(r0 + r, b) + 4 * k, sizeof four);
        const __m256i x = _mm256_set1_epi32(four), magnitude = _mm256_abs_epi8(x);
        const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w0, x)), ones);
        const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w1, x)), ones);
        dot[r][0] = _mm256_add_epi32(dot[r][0], p0);
        dot[r][1] = _mm256_add_epi32(dot[r][1], p1);
      }
    }
    _mm_prefetch(reinterpret_cast<const char*>(scales_of(rec)) + w.prefetch, _MM_HINT_T0);
    const __m256 s0 = _mm256_load_ps(scales_of(rec)), s1 = _mm256_load_ps(scales_of(rec) + 8);
    for (int r = 0; r < R; r++) {
      const __m256 xs = _mm256_set1_ps(a.scale[a.at(r0 + r, b)]);
      acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][0]), _mm256_mul_ps(s0, xs), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][1]), _mm256_mul_ps(s1, xs), acc[r][1]);
    }
  }
  const int64_t first = g * kGroup, n = std::min(kGroup, w.out - first);
  for (int r = 0; r < R; r++) {
    alignas(32) float sums[kGroup];
    _mm256_store_ps(sums, acc[r][0]);
    _mm256_store_ps(sums + 8, acc[r][1]);
    float* out = y + (r0 + r) * w.out + first;
    for (int64_t c = 0; c < n; c++) out[c] = w.bias ? sums[c] + w.bias[first + c] : sums[c];
  }
}

#include "int8_kernel.h"

void rows_times_weight(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end) {
  rows_times_weight_by<2, 1>(a, w, y, begin, end);
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

void prepare(const float* x, int64_t in, const Activations& a) { prepare_with(quantize_block, x, in, a); }

// R activation rows times J groups of 16 outputs. dpbusd multiplies the unsigned values (w + 128)
// by four activation bytes, broadcast, and adds the four products to each output's lane; starting
// from -128 * sum(x), eight steps leave the block's exact dot w . x.
template <int R, int J>
inline void dots(const Activations& a, int64_t r0, const Weights& w, float* y, int64_t g0) {
  __m512 acc[R][J];
  for (int r = 0; r < R; r++)
    for (int j = 0; j < J; j++) acc[r][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < w.blocks; b++) {
    const uint8_t* rec[J];
    for (int j = 0; j < J; j++) rec[j] = w.record(g0 + j, b);
    __m512i dot[R][J];
    for (int r = 0; r < R; r++) {
      const __m512i offset = _mm512_set1_epi32(a.offset[a.at(r0 + r, b)]);
      for (int j = 0; j < J; j++) dot[r][j] = offset;
    }
    for (int64_t k = 0; k < kQuads; k++) {
      __m512i values[J];
      for (int j = 0; j < J; j++) {
        const uint8_t* quad = rec[j] + k * kQuadBytes;
        _mm_prefetch(reinterpret_cast<const char*>(quad) + w.prefetch, _MM_HINT_T0);
        values[j] = _mm512_load_si512(quad);
      }
      for (int r = 0; r < R; r++) {
        int32_t four;
        std::memcpy(&four, a.values(r0 + r, b) + 4 * k, sizeof four);
        const __m512i x = _mm512_set1_epi32(four);
        for (int j = 0; j < J; j++) dot[r][j] = _mm512_dpbusd_epi32(dot[r][j], values[j], x);
      }
    }
    for (int j = 0; j < J; j++) {
      _mm_prefetch(reinterpret_cast<const char*>(scales_of(rec[j])) + w.prefetch, _MM_HINT_T0);
      const __m512 scales = _mm512_load_ps(scales_of(rec[j]));
      for (int r = 0; r < R; r++)
        acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][j]),
                                    _mm512_mul_ps(scales, _mm512_set1_ps(a.scale[a.at(r0 + r, b)])), acc[r][j]);
    }
  }
  for (int j = 0; j < J; j++) {
    const int64_t first = (g0 + j) * kGroup, n = std::min(kGroup, w.out - first);
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    const __m512 bias = w.bias ? _mm512_maskz_loadu_ps(mask, w.bias + first) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++) {
      const __m512 sum = w.bias ? _mm512_add_ps(acc[r][j], bias) : acc[r][j];
      _mm512_mask_storeu_ps(y + (r0 + r) * w.out + first, mask, sum);
    }
  }
}

#include "int8_kernel.h"

// One row meets four groups at once (decode); more rows go four at a time against two groups: 16
// accumulators, 8 dots, 2 weight registers of 32.
void rows_times_weight(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end) {
  if (a.rows == 1)
    rows_times_weight_by<1, 4>(a, w, y, begin, end);
  else
    rows_times_weight_by<4, 2>(a, w, y, begin, end);
}
}  // namespace vnni
#pragma GCC pop_options

struct Kernel {
  void (*prepare)(const float* x, int64_t in, const Activations& a);
  void (*rows_times_weight)(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end);
};

constexpr Kernel kScalar{scalar::prepare, scalar::rows_times_weight};
constexpr Kernel kAvx2{avx2::prepare, avx2::rows_times_weight};
constexpr Kernel kVnni{vnni::prepare, vnni::rows_times_weight};

// The kernel for `isa` (0: the widest this CPU runs, 1: AVX2, 2: scalar), or none.
const Kernel* kernel_for(int isa) {
  switch (isa) {
    case 0: return wizard::cpu::avx512_vnni() ? &kVnni : wizard::cpu::avx2() ? &kAvx2 : &kScalar;
    case 1: return wizard::cpu::avx2() ? &kAvx2 : nullptr;
    case 2: return &kScalar;
    default: return nullptr;
  }
}

std::string describe(const at::Tensor& t) {
  std::string sizes;
  for (int64_t s : t.sizes()) sizes += (sizes.empty() ? "" : ", ") + std::to_string(s);
  return std::string(c10::toString(t.scalar_type())) + " [" + sizes + "] on " + t.device().str();
}

int64_t blocks_of(int64_t in) { return (in + kBlock - 1) / kBlock; }

// The layout the kernels index by (the Rust side makes packed weights only from checked parts; this
// guards against tensors changed since, e.g. through a shallow clone).
void check_packed(const at::Tensor& packed, int64_t out, int64_t in) {
  if (!packed.device().is_cpu() || packed.scalar_type() != at::kByte || packed.dim() != 1 || !packed.is_contiguous())
    throw std::invalid_argument("int8 weight: the packed weight must be a contiguous uint8 CPU vector, got " +
                                describe(packed));
  if (out < 0 || in < 0 || packed.numel() != groups_of(out) * blocks_of(in) * kRecord)
    throw std::invalid_argument("int8 weight: the packed weight " + describe(packed) + " does not hold [" +
                                std::to_string(out) + ", " + std::to_string(in) + "]");
}

void check_parts(const at::Tensor& values, const at::Tensor& scales, int64_t in) {
  if (!values.device().is_cpu() || values.scalar_type() != at::kChar || values.dim() != 2 || !values.is_contiguous())
    throw std::invalid_argument("int8 weight: values must be a contiguous int8 CPU matrix, got " + describe(values));
  if (!scales.device().is_cpu() || scales.scalar_type() != at::kFloat || scales.dim() != 2 || !scales.is_contiguous())
    throw std::invalid_argument("int8 weight: scales must be a contiguous float CPU matrix, got " + describe(scales));
  if (in < 0 || values.size(1) != blocks_of(in) * kBlock)
    throw std::invalid_argument("int8 weight: values " + describe(values) + " do not hold " + std::to_string(in) +
                                " input features padded to a multiple of 32");
  if (scales.size(0) != values.size(0) || scales.size(1) != blocks_of(in))
    throw std::invalid_argument("int8 weight: scales " + describe(scales) + " do not match values " + describe(values));
}

// values [out, padded] and scales [out, blocks] into records (outputs past `out` hold zeros).
at::Tensor pack(const at::Tensor& values, const at::Tensor& scales) {
  const int64_t out = values.size(0), blocks = scales.size(1), groups = groups_of(out);
  auto packed = at::empty({groups * blocks * kRecord}, at::kByte);
  const int8_t* vp = values.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; g++)
      for (int64_t b = 0; b < blocks; b++) {
        uint8_t* rec = pp + (g * blocks + b) * kRecord;
        float* record_scales = reinterpret_cast<float*>(rec + kBlock * kGroup);
        for (int64_t c = 0; c < kGroup; c++) {
          const int64_t j = g * kGroup + c;
          for (int64_t k = 0; k < kBlock; k++)
            rec[(k / 4) * kQuadBytes + c * 4 + k % 4] =
                static_cast<uint8_t>((j < out ? int32_t{vp[(j * blocks + b) * kBlock + k]} : 0) + 128);
          record_scales[c] = j < out ? sp[j * blocks + b] : 0.0f;
        }
      }
  });
  return packed;
}

// The inverse of pack: values [out, padded], scales [out, blocks].
std::pair<at::Tensor, at::Tensor> unpack(const at::Tensor& packed, int64_t out, int64_t in) {
  const int64_t blocks = blocks_of(in);
  auto values = at::empty({out, blocks * kBlock}, at::kChar);
  auto scales = at::empty({out, blocks}, at::kFloat);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  int8_t* vp = values.data_ptr<int8_t>();
  float* sp = scales.data_ptr<float>();
  for (int64_t j = 0; j < out; j++)
    for (int64_t b = 0; b < blocks; b++) {
      const uint8_t* rec = pp + ((j / kGroup) * blocks + b) * kRecord;
      for (int64_t k = 0; k < kBlock; k++)
        vp[(j * blocks + b) * kBlock + k] = static_cast<int8_t>(value_at(rec, j % kGroup, k));
      sp[j * blocks + b] = scales_of(rec)[j % kGroup];
    }
  return {values, scales};
}

at::Tensor dequantize(const at::Tensor& packed, int64_t out, int64_t in) {
  const auto [values, scales] = unpack(packed, out, in);
  const int64_t blocks = scales.size(1);
  return (values.to(at::kFloat).view({out, blocks, kBlock}) * scales.unsqueeze(-1))
      .view({out, blocks * kBlock})
      .narrow(1, 0, in)
      .contiguous();
}

// Rows `ids` of the weight, dequantized as `dequantize` does: an embedding lookup in an int8 table.
at::Tensor rows(const at::Tensor& packed, int64_t out, int64_t in, const at::Tensor& ids) {
  const int64_t blocks = blocks_of(in);
  const auto wanted = ids.to(at::kCPU, at::kLong).contiguous();
  const int64_t n = wanted.numel();
  auto result = at::empty({n, in}, at::kFloat);
  const int64_t* ip = wanted.data_ptr<int64_t>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  float* rp = result.data_ptr<float>();
  for (int64_t i = 0; i < n; i++) {
    const int64_t j = ip[i];
    TORCH_CHECK(j >= 0 && j < out, "index ", j, " is outside the table's ", out, " rows");
    for (int64_t b = 0; b < blocks; b++) {
      const uint8_t* rec = pp + ((j / kGroup) * blocks + b) * kRecord;
      const float scale = scales_of(rec)[j % kGroup];
      for (int64_t k = 0; k < kBlock && b * kBlock + k < in; k++)
        rp[i * in + b * kBlock + k] = static_cast<float>(value_at(rec, j % kGroup, k)) * scale;
    }
  }
  return result;
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

// `rows` activation rows (at least one), each quantized once by prepare(), times a packed weight,
// threads claiming groups of 16 outputs: for wizard_int8_linear and the fused decode block. About 256K
// products per task, as many weight bytes as the fp32 kernel's 64K per task: small layers stay on
// one thread.
class Int8RowProduct : public wizard::RowProduct {
 public:
  Int8RowProduct(const Kernel& kernel, const at::Tensor& packed, const float* bias, int64_t rows, int64_t out,
                 int64_t in)
      : RowProduct(groups_of(out), kGroup, std::max<int64_t>(1, 262144 / (in * rows * kGroup)), 4),
        kernel_(kernel), in_(in), blocks_(blocks_of(in)),
        scratch_(new uint8_t[rows * blocks_ * kActivationBytes]),
        activations_{rows, blocks_, reinterpret_cast<int8_t*>(scratch_.get()),
                     reinterpret_cast<int32_t*>(scratch_.get() + rows * blocks_ * kBlock),
                     reinterpret_cast<float*>(scratch_.get() + rows * blocks_ * (kBlock + 4))},
        weights_{packed.data_ptr<uint8_t>(), bias, blocks_, out, prefetch_bytes.load(std::memory_order_relaxed)} {}

  bool prepares() const override { return true; }
  void prepare(const float* row, int64_t r) override {
    const Activations one{1, blocks_, activations_.q + r * blocks_ * kBlock, activations_.offset + r * blocks_,
                          activations_.scale + r * blocks_};
    kernel_.prepare(row, in_, one);
  }

  void run(const float*, float* y, int64_t begin, int64_t end) const override {
    kernel_.rows_times_weight(activations_, weights_, y, begin, end);
  }

 private:
  const Kernel& kernel_;
  const int64_t in_, blocks_;
  std::unique_ptr<uint8_t[]> scratch_;
  const Activations activations_;
  const Weights weights_;
};

}  // namespace

std::unique_ptr<wizard::RowProduct> wizard::int8_row_product(const at::Tensor& packed, const float* bias,
                                                             int64_t rows, int64_t out, int64_t in) {
  check_packed(packed, out, in);
  return std::make_unique<Int8RowProduct>(*kernel_for(0), packed, bias, rows, out, in);
}

extern "C" {

// How many bytes ahead of the records being read the kernels prefetch; `bytes` of 0 or more sets it.
int64_t wizard_int8_prefetch_bytes(int64_t bytes) {
  if (bytes >= 0) prefetch_bytes.store(bytes, std::memory_order_relaxed);
  return prefetch_bytes.load(std::memory_order_relaxed);
}

// Which kernel the widest choice runs on this CPU: 2 AVX-512 VNNI, 1 AVX2, 0 scalar.
int wizard_int8_kernel_isa() {
  const Kernel* widest = kernel_for(0);
  return widest == &kVnni ? 2 : widest == &kAvx2 ? 1 : 0;
}

// Whether this CPU runs the kernel for `isa` (as in wizard_int8_linear).
int wizard_int8_kernel_available(int isa) { return kernel_for(isa) != nullptr; }

// `*packed` = a new tch tensor holding the blocks of `weight`, a contiguous fp32 CPU matrix of
// finite values, packed for the kernels.
int wizard_int8_quantize(void* weight_handle, void** packed_out) {
  return wizard::guarded([&] {
    const auto& w = *static_cast<at::Tensor*>(weight_handle);
    if (!w.device().is_cpu() || w.scalar_type() != at::kFloat || w.dim() != 2 || !w.is_contiguous())
      throw std::invalid_argument("int8 quantize: expected a contiguous float CPU matrix, got " + describe(w));
    const int64_t out = w.size(0), in = w.size(1), blocks = blocks_of(in);
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
    *packed_out = new at::Tensor(pack(values, scales));
  });
}

// `*packed` = the checked parts (int8 values [out, padded], fp32 scales [out, blocks]) packed.
int wizard_int8_pack(void* values_handle, void* scales_handle, int64_t in, void** packed_out) {
  return wizard::guarded([&] {
    const auto& values = *static_cast<at::Tensor*>(values_handle);
    const auto& scales = *static_cast<at::Tensor*>(scales_handle);
    check_parts(values, scales, in);
    *packed_out = new at::Tensor(pack(values, scales));
  });
}

// `*values`, `*scales` = new tch tensors: the parts a packed weight [out, in] holds.
int wizard_int8_unpack(void* packed_handle, int64_t out, int64_t in, void** values_out, void** scales_out) {
  return wizard::guarded([&] {
    const auto& packed = *static_cast<at::Tensor*>(packed_handle);
    check_packed(packed, out, in);
    auto [values, scales] = unpack(packed, out, in);
    *values_out = new at::Tensor(std::move(values));
    *scales_out = new at::Tensor(std::move(scales));
  });
}

// `*result` = a new tch tensor: the fp32 [out, in] weight the blocks stand for.
int wizard_int8_dequantize(void* packed_handle, int64_t out, int64_t in, void** result) {
  return wizard::guarded([&] {
    const auto& packed = *static_cast<at::Tensor*>(packed_handle);
    check_packed(packed, out, in);
    *result = new at::Tensor(dequantize(packed, out, in));
  });
}

int wizard_int8_rows(void* packed_handle, int64_t out, int64_t in, void* ids_handle, void** result) {
  return wizard::guarded([&] {
    const auto& packed = *static_cast<at::Tensor*>(packed_handle);
    check_packed(packed, out, in);
    *result = new at::Tensor(rows(packed, out, in, *static_cast<at::Tensor*>(ids_handle)));
  });
}

// `*result` = a new tch tensor holding x @ dequantize(w)^T + bias (bias may be null): the kernel for
// `isa` (0: the widest this CPU runs, 1: AVX2, 2: scalar) for fp32 CPU rows that need no gradient,
// outside autocast (any count: decode, a batch, verification, prefill); otherwise the weight
// dequantized and at::linear.
int wizard_int8_linear(void* x_handle, void* packed_handle, int64_t out, int64_t in, void* bias_handle, int isa,
                       void** result) {
  return wizard::guarded([&] {
    const auto& x = *static_cast<at::Tensor*>(x_handle);
    const auto& packed = *static_cast<at::Tensor*>(packed_handle);
    c10::optional<at::Tensor> bias;
    if (bias_handle) bias = *static_cast<at::Tensor*>(bias_handle);
    check_packed(packed, out, in);
    const Kernel* kernel = kernel_for(isa);
    if (!kernel_applies(kernel, x, in, out, bias)) {
      *result = new at::Tensor(at::linear(x, dequantize(packed, out, in).to(x.device(), x.scalar_type()), bias));
      return;
    }
    const at::Tensor xc = x.contiguous();
    const int64_t rows = xc.numel() / in;
    auto sizes = x.sizes().vec();
    sizes.back() = out;
    auto y = at::empty(sizes, xc.options());
    if (rows > 0 && out > 0) {
      Int8RowProduct product(*kernel, packed, bias ? bias->data_ptr<float>() : nullptr, rows, out, in);
      const float* xp = xc.data_ptr<float>();
      for (int64_t r = 0; r < rows; r++) product.prepare(xp + r * in, r);
      float* yp = y.data_ptr<float>();
      wizard::balanced_for(
          product.units, product.grain, [&](int64_t begin, int64_t end) { product.run(xp, yp, begin, end); },
          product.multiple);
    }
    *result = new at::Tensor(std::move(y));
  });
}
}
