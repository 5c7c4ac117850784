// Weights quantized in blocks of 32 along `in` with one fp32 scale per block, in two formats, and
// `x @ w^T + b` over them for inference on CPU:
// - int8 (llama.cpp's q8_0): per block, scale = max|w| / 127 and q = round(w / scale) (ties to even;
//   every q in [-127, 127]). Files hold values as int8 [out, padded] (in rounded up to a multiple of
//   32, zeros after `in`).
// - int4 (q4_0's range): per block, q in [-8, 7], with the scale that minimises the block's squared
//   error among a few candidate roundings (see quantize_search4.h). Files hold values as uint8
//   [out, padded / 2], two per byte: value 2i in the low nibble, 2i + 1 in the high one, each plus 8.
// Files hold scales as fp32 [out, padded / 32] in both. Each is a half-precision number times one
// power of two per weight (`unshift`, which maps the weight's largest scale into (2^14, 2^15]: the
// half's range covers every scale down to 2^-29 of it): 2 bytes a block, as q8_0 and q4_0 store
// theirs, instead of 4, so int8 reads 1.0625 bytes a weight instead of 1.125 and int4 0.5625
// instead of 0.625. Quantizing rounds each scale to that form first, then the values (int8) against
// it; a file whose scales are not of that form has them rounded to it (by at most 2^-12 of each).
//
// The kernels read a packed copy instead (made once, when a weight is quantized or loaded): outputs in
// groups of 16 and, per group and block, one record of the block's values of the 16 outputs, and in a
// second region, in the same order, the 16 outputs' half scales (Layout below). int8 records (512
// bytes) hold values as [8 quads][16 outputs][4 values], each plus 128 (unsigned bytes); int4 records
// (256 bytes) hold four 64-byte lines [16 outputs][4 bytes], line p's low nibbles quad p and high
// nibbles quad p + 4, each plus 8. One load (one nibble mask) holds four values of 16 outputs, which
// one VNNI step multiplies by four activation bytes, so a block's integer dot comes out whole for 16
// outputs at once. The two formats' packed sizes differ for every shape, which is how the fused
// decode block tells them apart.
//
// Each activation row is quantized as int8 blocks, and every output is
//   y = 0; for each block b in order:
//     y = fma(float(dot_b), float(half scale_b) * (activation scale_b * unshift), y);
//   then y + bias,
// where dot_b, the block's integer dot, is exact (|dot_b| <= 32 * 127 * 128 < 2^24: the float is
// exact too), and so are the widening of the half and the product with a power of two: the scales'
// product is the weight's scale times the activation's, rounded once. So a row gives the same bits
// alone or with others, whatever the thread split, and the AVX-512 VNNI, AVX2 and scalar kernels give
// the same bits as each other.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu.h"
#include "dense.h"
#include "guard.h"
#include "parallel.h"

// GCC 12's AVX-512 reduction intrinsics read an intentionally undefined register (a false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kGroup = 16;              // outputs per record
constexpr int64_t kQuads = kBlock / 4;      // four-value steps per block
constexpr int64_t kQuadBytes = 4 * kGroup;  // one quad of the 16 outputs (int8), or two (int4)
// Bytes of a block's values of 16 outputs (a record: 512 and 256), and of their half scales.
constexpr int64_t values_bytes(int bits) { return kBlock * kGroup * bits / 8; }
constexpr int64_t kScalesBytes = 2 * kGroup;
// After the scales, `unshift` (an fp32), padded so that a packed weight stays a multiple of 64 bytes.
constexpr int64_t kTailBytes = 64;
// What the kernels add to each stored value (so it is unsigned).
constexpr int32_t stored_offset(int bits) { return bits == 8 ? 128 : 8; }
// How far ahead of the records being read the kernels prefetch the weight: 12 KiB measured best on
// one Zen 5 core, where the hardware prefetchers lost track of interleaved streams, and 0 (no lead)
// faster on another AMD VM for a model of 81 MB; the load-time calibration (kernels::calibrate) times
// both and sets this.
std::atomic<int64_t> prefetch_bytes{12 * 1024};  // kernels::int8::PREFETCH_LEAD

int64_t groups_of(int64_t out) { return (out + kGroup - 1) / kGroup; }

int64_t blocks_of(int64_t in) { return (in + kBlock - 1) / kBlock; }

// Where the parts of a packed weight [out, in] lie: [groups][blocks] records of values, then
// [groups][blocks][16] half scales, then the tail holding `unshift`.
struct Layout {
  int64_t groups, blocks, scales_at, unshift_at, bytes;
  Layout(int64_t out, int64_t in, int bits)
      : groups(groups_of(out)), blocks(blocks_of(in)), scales_at(groups * blocks * values_bytes(bits)),
        unshift_at(scales_at + groups * blocks * kScalesBytes), bytes(unshift_at + kTailBytes) {}
  // Byte offsets of group g's record of block b, and of its scales.
  int64_t record_at(int bits, int64_t g, int64_t b) const { return (g * blocks + b) * values_bytes(bits); }
  int64_t block_scales_at(int64_t g, int64_t b) const { return scales_at + (g * blocks + b) * kScalesBytes; }
  const uint16_t* scales(const uint8_t* packed, int64_t g, int64_t b) const {
    return reinterpret_cast<const uint16_t*>(packed + block_scales_at(g, b));
  }
  float unshift(const uint8_t* packed) const {
    float u;
    std::memcpy(&u, packed + unshift_at, sizeof u);
    return u;
  }
};

// The power of two that, times a half, gives back a weight's `scales`: 2^-15 times the least power of
// two at or above the largest magnitude, so that one maps into (2^14, 2^15]; half of that where it
// maps below 2^14 + 8, which rounds to the half 2^14 (so that the scales rounded give the same
// unshift, and a weight packed again the same bytes).
float unshift_for(const at::Tensor& scales) {
  const float largest = scales.numel() > 0 ? scales.abs().max().item<float>() : 0.0f;
  if (!(largest > 0.0f)) return 1.0f;
  int exponent;
  const float fraction = std::frexp(largest, &exponent);  // largest = fraction * 2^exponent, fraction in [0.5, 1)
  const float unshift = std::ldexp(1.0f, (fraction == 0.5f ? exponent - 1 : exponent) - 15);
  return static_cast<float>(c10::Half(largest / unshift)) == 16384.0f ? unshift / 2 : unshift;
}

inline float widen_half(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }
// `scale` as the half that, times `unshift`, stands for it (rounded to the nearest).
inline uint16_t narrow_scale(float scale, float unshift) { return c10::Half(scale / unshift).x; }

// Refuses `scales` that halves over `unshift` do not hold to a half's precision (2^-11 of each): a
// scale more than about 2^28 under the weight's largest falls among the subnormal halves or to zero,
// and its block's outputs with it. `remedy` says what to do instead.
void check_scale_range(const at::Tensor& scales, float unshift, const char* remedy) {
  const float* sp = scales.data_ptr<float>();
  const int64_t blocks = scales.size(1);
  for (int64_t i = 0; i < scales.numel(); i++) {
    const float kept = widen_half(narrow_scale(sp[i], unshift)) * unshift;
    if (std::fabs(kept - sp[i]) <= std::fabs(sp[i]) * 0x1p-11f) continue;
    const float scale = std::fabs(sp[i]), largest = scales.abs().max().item<float>();
    char message[400];
    std::snprintf(message, sizeof message,
                  "the scale of block %lld of row %lld (%g) is %.3g times smaller than the weight's largest (%g), "
                  "more than float16 scales over one shared power of two hold (about 2^28); %s",
                  static_cast<long long>(i % blocks), static_cast<long long>(i / blocks), scale,
                  static_cast<double>(largest) / scale,
                  largest, remedy);
    throw std::invalid_argument(message);
  }
}

// A packed weight as the kernels read it.
struct Weights {
  const uint8_t* values;   // [groups][blocks] records
  const uint16_t* scales;  // [groups][blocks][16] half scales
  float unshift;           // what every half scale stands for is itself times this (prepare() folds
                           // it into the activation scales)
  const float* bias;       // [out], or null
  int64_t blocks, out;
  int64_t prefetch;        // bytes ahead of the records read
  int bits;                // 8 or 4
  const uint8_t* record(int64_t g, int64_t b) const { return values + (g * blocks + b) * values_bytes(bits); }
  const uint16_t* scales_of(int64_t g, int64_t b) const { return scales + (g * blocks + b) * kGroup; }
  // How far ahead of the scales read to prefetch: as far, in blocks, as `prefetch` is in records.
  int64_t scales_prefetch() const { return prefetch * kScalesBytes / values_bytes(bits); }
};

// The activation rows, quantized once per call.
struct Activations {
  int64_t rows, blocks;
  int8_t* q;        // [rows][blocks * 32]
  int32_t* sum;     // [rows][blocks]: the block's sum (VNNI's unsigned weights add offset * it)
  float* scale;     // [rows][blocks]: the block's scale, times the weight's unshift once prepared
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
      a.sum[a.at(r, b)] = sum;
    }
}

// Output `col`'s value at position k of a record: the stored byte (int8) or nibble (int4), unsigned,
// minus its offset.
template <int Bits>
inline int32_t value_at(const uint8_t* record, int64_t col, int64_t k) {
  if constexpr (Bits == 8) {
    return int32_t{record[(k / 4) * kQuadBytes + col * 4 + k % 4]} - 128;
  } else {
    const uint8_t byte = record[((k / 4) % 4) * kQuadBytes + col * 4 + k % 4];
    return int32_t{k < 16 ? byte & 0x0F : byte >> 4} - 8;
  }
}
inline int32_t value_at(int bits, const uint8_t* record, int64_t col, int64_t k) {
  return bits == 8 ? value_at<8>(record, col, k) : value_at<4>(record, col, k);
}

// Portable: any x86-64 CPU. Slow (tens of times slower than AVX2), but in the same order as the
// vector kernels.
namespace scalar {

void prepare(const float* x, int64_t in, const Activations& a) { prepare_with(quantize_block_ref, x, in, a); }

template <int Bits, int R, int J>
inline void dots(const Activations& a, int64_t r, const Weights& w, float* y, int64_t g) {
  static_assert(R == 1 && J == 1, "the scalar kernel takes one row and one group at a time");
  float acc[kGroup] = {};
  for (int64_t b = 0; b < w.blocks; b++) {
    const uint8_t* rec = w.record(g, b);
    const uint16_t* scales = w.scales_of(g, b);
    const int8_t* q = a.values(r, b);
    const float activation_scale = a.scale[a.at(r, b)];
    for (int64_t c = 0; c < kGroup; c++) {
      int32_t dot = 0;
      for (int64_t k = 0; k < kBlock; k++) dot += int32_t{q[k]} * value_at<Bits>(rec, c, k);
      acc[c] = std::fma(static_cast<float>(dot), widen_half(scales[c]) * activation_scale, acc[c]);
    }
  }
  for (int64_t c = 0; c < kGroup && g * kGroup + c < w.out; c++) {
    const int64_t j = g * kGroup + c;
    y[r * w.out + j] = w.bias ? acc[c] + w.bias[j] : acc[c];
  }
}

#include "quantized_kernel.h"

void rows_times_weight(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end) {
  rows_times_weight_of<1, 1>(a, w, y, begin, end);
}
}  // namespace scalar

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
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

// The largest magnitude of the first `n` (at most 32) of `x`: quantize_pack8's block maximum.
inline float block_amax(const float* x, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps();
  for (int k = 0; k < 4; k++) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, load_first(x + 8 * k, n - 8 * k)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// quantize_pack8's values of one block: round(x / scale) (to nearest, ties to even) clamped to
// +-127, zeros past `n` columns; `scale` is not 0. The same values as the scalar loop.
inline void block_values8(const float* x, int64_t n, float scale, int8_t* q) {
  const __m256 vd = _mm256_set1_ps(scale), low = _mm256_set1_ps(-127.0f), high = _mm256_set1_ps(127.0f);
  __m256i i[4];
  for (int k = 0; k < 4; k++) {
    const __m256 v = _mm256_div_ps(load_first(x + 8 * k, n - 8 * k), vd);
    i[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, low), high));
  }
  __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), packed);
}

// The block's integer dots of R activation rows with one group's int8 values, as two halves of 8
// outputs. The sign trick: maddubs multiplies unsigned by signed bytes, so |x| times w with x's
// sign (|products| <= 127 * 127, no 16-bit pair saturates), and madd sums the pairs into each
// output's four-product lane.
template <int R>
inline void block_dots8(const Activations& a, int64_t r0, int64_t b, const Weights& w, const uint8_t* rec,
                        __m256i (&dot)[R][2]) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
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
      dot[r][0] = _mm256_add_epi32(dot[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w0, x)), ones));
      dot[r][1] = _mm256_add_epi32(dot[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(w1, x)), ones));
    }
  }
}

// The same for int4 values, which stay unsigned (w + 8 <= 15): maddubs multiplies them by x as it is,
// and a pair is at most 2 * 15 * 127, so the block's eight steps add up in 16 bits (<= 30480) before
// one madd widens them; minus 8 * sum(x) leaves the exact dot.
template <int R>
inline void block_dots4(const Activations& a, int64_t r0, int64_t b, const Weights& w, const uint8_t* rec,
                        __m256i (&dot)[R][2]) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256i pairs[R][2];
  for (int r = 0; r < R; r++) pairs[r][0] = pairs[r][1] = _mm256_setzero_si256();
  for (int64_t p = 0; p < kQuads / 2; p++) {
    const uint8_t* line = rec + p * kQuadBytes;
    _mm_prefetch(reinterpret_cast<const char*>(line) + w.prefetch, _MM_HINT_T0);
    const __m256i l0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(line));
    const __m256i l1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(line + 32));
    const __m256i low0 = _mm256_and_si256(l0, nibble), high0 = _mm256_and_si256(_mm256_srli_epi16(l0, 4), nibble);
    const __m256i low1 = _mm256_and_si256(l1, nibble), high1 = _mm256_and_si256(_mm256_srli_epi16(l1, 4), nibble);
    for (int r = 0; r < R; r++) {
      int32_t four_low, four_high;
      std::memcpy(&four_low, a.values(r0 + r, b) + 4 * p, sizeof four_low);
      std::memcpy(&four_high, a.values(r0 + r, b) + 16 + 4 * p, sizeof four_high);
      const __m256i x_low = _mm256_set1_epi32(four_low), x_high = _mm256_set1_epi32(four_high);
      pairs[r][0] = _mm256_add_epi16(pairs[r][0], _mm256_maddubs_epi16(low0, x_low));
      pairs[r][0] = _mm256_add_epi16(pairs[r][0], _mm256_maddubs_epi16(high0, x_high));
      pairs[r][1] = _mm256_add_epi16(pairs[r][1], _mm256_maddubs_epi16(low1, x_low));
      pairs[r][1] = _mm256_add_epi16(pairs[r][1], _mm256_maddubs_epi16(high1, x_high));
    }
  }
  for (int r = 0; r < R; r++) {
    const __m256i offset = _mm256_set1_epi32(-stored_offset(4) * a.sum[a.at(r0 + r, b)]);
    dot[r][0] = _mm256_add_epi32(_mm256_madd_epi16(pairs[r][0], ones), offset);
    dot[r][1] = _mm256_add_epi32(_mm256_madd_epi16(pairs[r][1], ones), offset);
  }
}

// R activation rows times J groups of 16 outputs, one group after the other in each block.
template <int Bits, int R, int J>
inline void dots(const Activations& a, int64_t r0, const Weights& w, float* y, int64_t g0) {
  __m256 acc[J][R][2];
  for (int j = 0; j < J; j++)
    for (int r = 0; r < R; r++) acc[j][r][0] = acc[j][r][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < w.blocks; b++) {
    for (int j = 0; j < J; j++) {
      const uint8_t* rec = w.record(g0 + j, b);
      __m256i dot[R][2];
      if constexpr (Bits == 8)
        block_dots8<R>(a, r0, b, w, rec, dot);
      else
        block_dots4<R>(a, r0, b, w, rec, dot);
      const uint16_t* scales = w.scales_of(g0 + j, b);
      _mm_prefetch(reinterpret_cast<const char*>(scales) + w.scales_prefetch(), _MM_HINT_T0);
      const __m256 s0 = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(scales)));
      const __m256 s1 = _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(scales + 8)));
      for (int r = 0; r < R; r++) {
        const __m256 xs = _mm256_set1_ps(a.scale[a.at(r0 + r, b)]);
        acc[j][r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][0]), _mm256_mul_ps(s0, xs), acc[j][r][0]);
        acc[j][r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][1]), _mm256_mul_ps(s1, xs), acc[j][r][1]);
      }
    }
  }
  for (int j = 0; j < J; j++) {
    const int64_t first = (g0 + j) * kGroup, n = std::min(kGroup, w.out - first);
    for (int r = 0; r < R; r++) {
      alignas(32) float sums[kGroup];
      _mm256_store_ps(sums, acc[j][r][0]);
      _mm256_store_ps(sums + 8, acc[j][r][1]);
      float* out = y + (r0 + r) * w.out + first;
      for (int64_t c = 0; c < n; c++) out[c] = w.bias ? sums[c] + w.bias[first + c] : sums[c];
    }
  }
}

#include "quantized_kernel.h"

// A decode step's int8 row meets two groups at once: two streams of records keep more of the
// memory's rate than one (the row read 1B's weights at 37-39 GB/s, and 42-46 after).
void rows_times_weight(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end) {
  if (a.rows == 1 && w.bits == 8)
    rows_times_weight_by<8, 1, 2>(a, w, y, begin, end);
  else
    rows_times_weight_of<2, 1>(a, w, y, begin, end);
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

// R activation rows times J groups of 16 outputs. dpbusd multiplies the unsigned values (w + 128,
// or w + 8) by four activation bytes, broadcast, and adds the four products to each output's lane;
// starting from -offset * sum(x), eight steps leave the block's exact dot w . x. An int4 line gives
// two steps' values: its low nibbles and its high ones.
template <int Bits, int R, int J>
inline void dots(const Activations& a, int64_t r0, const Weights& w, float* y, int64_t g0) {
  __m512 acc[R][J];
  for (int r = 0; r < R; r++)
    for (int j = 0; j < J; j++) acc[r][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < w.blocks; b++) {
    const uint8_t* rec[J];
    for (int j = 0; j < J; j++) rec[j] = w.record(g0 + j, b);
    __m512i dot[R][J];
    for (int r = 0; r < R; r++) {
      const __m512i offset = _mm512_set1_epi32(-stored_offset(Bits) * a.sum[a.at(r0 + r, b)]);
      for (int j = 0; j < J; j++) dot[r][j] = offset;
    }
    if constexpr (Bits == 8) {
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
    } else {
      const __m512i nibble = _mm512_set1_epi8(0x0F);
      for (int64_t p = 0; p < kQuads / 2; p++) {
        __m512i low[J], high[J];
        for (int j = 0; j < J; j++) {
          const uint8_t* line = rec[j] + p * kQuadBytes;
          _mm_prefetch(reinterpret_cast<const char*>(line) + w.prefetch, _MM_HINT_T0);
          const __m512i both = _mm512_load_si512(line);
          low[j] = _mm512_and_si512(both, nibble);
          high[j] = _mm512_and_si512(_mm512_srli_epi32(both, 4), nibble);
        }
        for (int r = 0; r < R; r++) {
          int32_t four_low, four_high;
          std::memcpy(&four_low, a.values(r0 + r, b) + 4 * p, sizeof four_low);
          std::memcpy(&four_high, a.values(r0 + r, b) + 16 + 4 * p, sizeof four_high);
          const __m512i x_low = _mm512_set1_epi32(four_low), x_high = _mm512_set1_epi32(four_high);
          for (int j = 0; j < J; j++) {
            dot[r][j] = _mm512_dpbusd_epi32(dot[r][j], low[j], x_low);
            dot[r][j] = _mm512_dpbusd_epi32(dot[r][j], high[j], x_high);
          }
        }
      }
    }
    for (int j = 0; j < J; j++) {
      const uint16_t* record_scales = w.scales_of(g0 + j, b);
      _mm_prefetch(reinterpret_cast<const char*>(record_scales) + w.scales_prefetch(), _MM_HINT_T0);
      const __m512 scales = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(record_scales)));
      for (int r = 0; r < R; r++)
        acc[r][j] = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(dot[r][j]),
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

#include "quantized_kernel.h"

// One row meets four groups at once (decode); more rows go four at a time against two groups: 16
// accumulators, 8 dots, 2 weight registers of 32.
void rows_times_weight(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end) {
  if (a.rows == 1)
    rows_times_weight_of<1, 4>(a, w, y, begin, end);
  else
    rows_times_weight_of<4, 2>(a, w, y, begin, end);
}
}  // namespace vnni
#pragma GCC pop_options

// The int4 scale search for each instruction set.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
namespace scalar {
#include "quantize_search4.h"
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#pragma GCC optimize("fp-contract=off")
namespace avx2 {
#include "quantize_search4.h"
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma")
#pragma GCC optimize("fp-contract=off")
namespace vnni {
#include "quantize_search4.h"
}
#pragma GCC pop_options

struct Kernel {
  void (*prepare)(const float* x, int64_t in, const Activations& a);
  void (*rows_times_weight)(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end);
  void (*quantize_row4)(const float* row, int64_t in, int8_t* q, float* scales);
};

constexpr Kernel kScalar{scalar::prepare, scalar::rows_times_weight, scalar::quantize_row4};
constexpr Kernel kAvx2{avx2::prepare, avx2::rows_times_weight, avx2::quantize_row4};
constexpr Kernel kVnni{vnni::prepare, vnni::rows_times_weight, vnni::quantize_row4};

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

std::string format_name(int bits) { return bits == 8 ? "int8" : "int4"; }

void check_bits(int bits) {
  if (bits != 8 && bits != 4)
    throw std::invalid_argument("quantized weight: " + std::to_string(bits) + " bits is not a format (8 or 4)");
}

// The layout the kernels index by (the Rust side makes packed weights only from checked parts; this
// guards against tensors changed since, e.g. through a shallow clone): which format's records hold
// [out, in], told by their size (an int8 record is 512 bytes, an int4 one 256).
// (A weight with no inputs or outputs has no records in either format.)
bool holds(const at::Tensor& packed, int64_t out, int64_t in, int bits) {
  if (!packed.device().is_cpu() || packed.scalar_type() != at::kByte || packed.dim() != 1 || !packed.is_contiguous())
    throw std::invalid_argument("quantized weight: the packed weight must be a contiguous uint8 CPU vector, got " +
                                describe(packed));
  return out >= 0 && in >= 0 && packed.numel() == Layout(out, in, bits).bytes;
}

[[noreturn]] void does_not_hold(const at::Tensor& packed, int64_t out, int64_t in, const std::string& format) {
  throw std::invalid_argument("quantized weight: the packed weight " + describe(packed) + " does not hold [" +
                              std::to_string(out) + ", " + std::to_string(in) + "]" + format);
}

int bits_of_packed(const at::Tensor& packed, int64_t out, int64_t in) {
  for (int bits : {8, 4})
    if (holds(packed, out, in, bits)) return bits;
  does_not_hold(packed, out, in, "");
}

void check_packed(const at::Tensor& packed, int64_t out, int64_t in, int bits) {
  check_bits(bits);
  if (!holds(packed, out, in, bits)) does_not_hold(packed, out, in, " as " + format_name(bits));
}

// Stored values per byte.
int64_t per_byte(int bits) { return 8 / bits; }

void check_parts(const at::Tensor& values, const at::Tensor& scales, int64_t in, int bits) {
  check_bits(bits);
  const std::string name = format_name(bits);
  const auto value_type = bits == 8 ? at::kChar : at::kByte;
  if (!values.device().is_cpu() || values.scalar_type() != value_type || values.dim() != 2 || !values.is_contiguous())
    throw std::invalid_argument(name + " weight: values must be a contiguous " + (bits == 8 ? "int8" : "uint8") +
                                " CPU matrix, got " + describe(values));
  if (!scales.device().is_cpu() || scales.scalar_type() != at::kFloat || scales.dim() != 2 || !scales.is_contiguous())
    throw std::invalid_argument(name + " weight: scales must be a contiguous float CPU matrix, got " +
                                describe(scales));
  if (in < 0 || values.size(1) != blocks_of(in) * kBlock / per_byte(bits))
    throw std::invalid_argument(name + " weight: values " + describe(values) + " do not hold " + std::to_string(in) +
                                " input features padded to a multiple of 32");
  if (scales.size(0) != values.size(0) || scales.size(1) != blocks_of(in))
    throw std::invalid_argument(name + " weight: scales " + describe(scales) + " do not match values " +
                                describe(values));
}

// A weight's `unshift` into the tail of its records `pp`.
void put_unshift(uint8_t* pp, const Layout& layout, float unshift) {
  std::memset(pp + layout.unshift_at, 0, kTailBytes);
  std::memcpy(pp + layout.unshift_at, &unshift, sizeof unshift);
}

// Rounds a weight's `scales` in place to the form the kernels read, a half times the weight's
// unshift, which it returns (the rounded scales keep it: see unshift_for).
float round_scales(const at::Tensor& scales) {
  const float unshift = unshift_for(scales);
  check_scale_range(scales, unshift, "load this model as float32 or bfloat16");
  float* sp = scales.data_ptr<float>();
  for (int64_t i = 0; i < scales.numel(); i++) sp[i] = widen_half(narrow_scale(sp[i], unshift)) * unshift;
  return unshift;
}

// Memory for a weight's records, its tail holding `unshift`.
at::Tensor new_records(const Layout& layout, float unshift) {
  auto packed = at::empty({layout.bytes}, at::kByte);
  put_unshift(packed.data_ptr<uint8_t>(), layout, unshift);
  return packed;
}

// Output c's 32 int8 values of a block into its record (`values` null: zeros), each quad of 4 as one
// word stored plus 128 (the sign bit flipped), at quad q's line, the output's four bytes.
inline void put_values8(uint8_t* rec, int64_t c, const void* values) {
  for (int64_t quad = 0; quad < kBlock / 4; quad++) {
    uint32_t word = 0;
    if (values) std::memcpy(&word, static_cast<const uint8_t*>(values) + 4 * quad, sizeof word);
    word ^= 0x80808080u;
    std::memcpy(rec + quad * kQuadBytes + c * 4, &word, sizeof word);
  }
}

// Output c's 32 int4 values of a block (`values` null: zeros) into its record, each plus 8: value k
// of quad p in the low nibble and value k + 16 in the high nibble of the same byte of line p.
inline void put_values4(uint8_t* rec, int64_t c, const int8_t* values) {
  for (int64_t line = 0; line < kQuads / 2; line++) {
    uint8_t bytes[4];
    for (int64_t k = 0; k < 4; k++) {
      const int low = values ? values[4 * line + k] : 0, high = values ? values[16 + 4 * line + k] : 0;
      bytes[k] = static_cast<uint8_t>((low + 8) | (high + 8) << 4);
    }
    std::memcpy(rec + line * kQuadBytes + c * 4, bytes, sizeof bytes);
  }
}

// A block's 32 values of int4 parts (16 bytes, value 2i in byte i's low nibble, each plus 8), signed.
inline void nibbles_to_values(const uint8_t* bytes, int8_t* values) {
  for (int64_t i = 0; i < kBlock / 2; i++) {
    values[2 * i] = static_cast<int8_t>((bytes[i] & 0x0F) - 8);
    values[2 * i + 1] = static_cast<int8_t>((bytes[i] >> 4) - 8);
  }
}

// The parts into records (outputs past `out` hold zeros), each scale as the nearest half times the
// weight's `unshift`.
at::Tensor pack(const at::Tensor& values, const at::Tensor& scales, int64_t in, int bits) {
  const int64_t out = values.size(0);
  const Layout layout(out, in, bits);
  const int64_t blocks = layout.blocks;
  const float* sp = scales.data_ptr<float>();
  const float unshift = unshift_for(scales);
  check_scale_range(scales, unshift, "quantize the model again from its original weights");
  auto packed = new_records(layout, unshift);
  const auto* vp = static_cast<const uint8_t*>(values.data_ptr());
  const int64_t stride = values.size(1);
  uint8_t* pp = packed.data_ptr<uint8_t>();
  at::parallel_for(0, layout.groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; g++)
      for (int64_t b = 0; b < blocks; b++) {
        uint8_t* rec = pp + layout.record_at(bits, g, b);
        auto* record_scales = reinterpret_cast<uint16_t*>(pp + layout.block_scales_at(g, b));
        for (int64_t c = 0; c < kGroup; c++) {
          const int64_t j = g * kGroup + c;
          if (bits == 8) {
            put_values8(rec, c, j < out ? vp + j * stride + b * kBlock : nullptr);
          } else {
            int8_t values[kBlock];
            if (j < out) nibbles_to_values(vp + j * stride + b * kBlock / 2, values);
            put_values4(rec, c, j < out ? values : nullptr);
          }
          record_scales[c] = j < out ? narrow_scale(sp[j * blocks + b], unshift) : 0;
        }
      }
  });
  return packed;
}

// The inverse of pack: the parts.
std::pair<at::Tensor, at::Tensor> unpack(const at::Tensor& packed, int64_t out, int64_t in, int bits) {
  const Layout layout(out, in, bits);
  const int64_t blocks = layout.blocks;
  auto values = at::zeros({out, blocks * kBlock / per_byte(bits)}, bits == 8 ? at::kChar : at::kByte);
  auto scales = at::empty({out, blocks}, at::kFloat);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  auto* vp = static_cast<uint8_t*>(values.data_ptr());
  const int64_t stride = values.size(1);
  float* sp = scales.data_ptr<float>();
  const float unshift = layout.unshift(pp);
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; j++)
      for (int64_t b = 0; b < blocks; b++) {
        const uint8_t* rec = pp + layout.record_at(bits, j / kGroup, b);
        for (int64_t k = 0; k < kBlock; k++) {
          const int32_t value = value_at(bits, rec, j % kGroup, k);
          const int64_t column = b * kBlock + k;
          if (bits == 8)
            vp[j * stride + column] = static_cast<uint8_t>(static_cast<int8_t>(value));
          else
            vp[j * stride + column / 2] |= static_cast<uint8_t>((value + 8) << (column % 2 == 0 ? 0 : 4));
        }
        sp[j * blocks + b] = widen_half(layout.scales(pp, j / kGroup, b)[j % kGroup]) * unshift;
      }
  });
  return {values, scales};
}

// Rows `ids` of the weight, fp32: value times its block's scale (an embedding lookup in a quantized
// table; all rows, for dequantize).
at::Tensor rows(const at::Tensor& packed, int64_t out, int64_t in, int bits, const at::Tensor& ids) {
  const Layout layout(out, in, bits);
  const int64_t blocks = layout.blocks;
  const auto wanted = ids.to(at::kCPU, at::kLong).contiguous();
  const int64_t n = wanted.numel();
  auto result = at::empty({n, in}, at::kFloat);
  const int64_t* ip = wanted.data_ptr<int64_t>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  float* rp = result.data_ptr<float>();
  const float unshift = layout.unshift(pp);
  for (int64_t i = 0; i < n; i++)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < out, "index ", ip[i], " is outside the table's ", out, " rows");
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {
      const int64_t j = ip[i];
      for (int64_t b = 0; b < blocks; b++) {
        const uint8_t* rec = pp + layout.record_at(bits, j / kGroup, b);
        const float scale = widen_half(layout.scales(pp, j / kGroup, b)[j % kGroup]) * unshift;
        for (int64_t k = 0; k < kBlock && b * kBlock + k < in; k++)
          rp[i * in + b * kBlock + k] = static_cast<float>(value_at(bits, rec, j % kGroup, k)) * scale;
      }
    }
  });
  return result;
}

at::Tensor dequantize(const at::Tensor& packed, int64_t out, int64_t in, int bits) {
  return rows(packed, out, in, bits, at::arange(out, at::kLong));
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

// A finite fp32 weight [out, in] as packed int4 records: each block's values and scale from its
// scale search (quantize_search4.h), the scale rounded to the form the kernels read (a half times the
// weight's `unshift`); a block whose scale rounds to 0 holds zeros. Values go into their records a
// group of 16 rows at a time, before the unshift (which needs every scale) is known.
at::Tensor quantize_pack4(const at::Tensor& w, const Kernel& kernel) {
  const int64_t out = w.size(0), in = w.size(1), blocks = blocks_of(in);
  const Layout layout(out, in, 4);
  auto scales = at::empty({out, blocks}, at::kFloat);
  const float* wp = w.data_ptr<float>();
  float* sp = scales.data_ptr<float>();
  auto packed = at::empty({layout.bytes}, at::kByte);
  uint8_t* pp = packed.data_ptr<uint8_t>();
  at::parallel_for(0, layout.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> rows(kGroup * blocks * kBlock);
    for (int64_t g = begin; g < end; g++) {
      const int64_t first = g * kGroup, n = std::min(kGroup, out - first);
      for (int64_t c = 0; c < n; c++)
        kernel.quantize_row4(wp + (first + c) * in, in, rows.data() + c * blocks * kBlock, sp + (first + c) * blocks);
      for (int64_t b = 0; b < blocks; b++)
        for (int64_t c = 0; c < kGroup; c++)
          put_values4(pp + layout.record_at(4, g, b), c, c < n ? rows.data() + (c * blocks + b) * kBlock : nullptr);
    }
  });
  const float unshift = round_scales(scales);
  put_unshift(pp, layout, unshift);
  at::parallel_for(0, layout.groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; g++)
      for (int64_t b = 0; b < blocks; b++) {
        auto* record_scales = reinterpret_cast<uint16_t*>(pp + layout.block_scales_at(g, b));
        for (int64_t c = 0; c < kGroup; c++) {
          const int64_t j = g * kGroup + c;
          const float scale = j < out ? sp[j * blocks + b] : 0.0f;
          if (scale == 0.0f) put_values4(pp + layout.record_at(4, g, b), c, nullptr);
          record_scales[c] = narrow_scale(scale, unshift);
        }
      }
  });
  return packed;
}

// A finite fp32 weight [out, in] as packed int8 records: each block's scale is its largest magnitude
// over 127, rounded to the form the kernels read (a half times the weight's `unshift`), and its values
// are taken against the rounded scale, so that each is within half of it of its weight. Written
// straight into the records, with no [out, in] values in between (1 GB for a 1B model).
at::Tensor quantize_pack8(const at::Tensor& w, const Kernel& kernel) {
  const int64_t out = w.size(0), in = w.size(1), blocks = blocks_of(in);
  const Layout layout(out, in, 8);
  const float* wp = w.data_ptr<float>();
  const bool vector = &kernel != &kScalar;
  auto scales = at::empty({out, blocks}, at::kFloat);
  float* sp = scales.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; j++)
      for (int64_t b = 0; b < blocks; b++) {
        const float* v = wp + j * in + b * kBlock;
        const int64_t n = std::min(kBlock, in - b * kBlock);
        float amax = 0.0f;
        if (vector)
          amax = avx2::block_amax(v, n);
        else
          for (int64_t k = 0; k < n; k++) amax = std::max(amax, std::fabs(v[k]));
        sp[j * blocks + b] = amax / 127.0f;
      }
  });
  const float unshift = round_scales(scales);
  auto packed = new_records(layout, unshift);
  uint8_t* pp = packed.data_ptr<uint8_t>();
  at::parallel_for(0, layout.groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; g++)
      for (int64_t b = 0; b < blocks; b++) {
        uint8_t* rec = pp + layout.record_at(8, g, b);
        auto* record_scales = reinterpret_cast<uint16_t*>(pp + layout.block_scales_at(g, b));
        for (int64_t c = 0; c < kGroup; c++) {
          const int64_t j = g * kGroup + c;
          alignas(32) int8_t q[kBlock] = {};
          const float scale = j < out ? sp[j * blocks + b] : 0.0f;
          if (scale != 0.0f) {
            const float* v = wp + j * in + b * kBlock;
            const int64_t n = std::min(kBlock, in - b * kBlock);
            if (vector)
              avx2::block_values8(v, n, scale, q);
            else
              for (int64_t k = 0; k < n; k++)
                q[k] = static_cast<int8_t>(std::clamp(std::nearbyint(v[k] / scale), -127.f, 127.f));
          }
          put_values8(rec, c, q);
          record_scales[c] = narrow_scale(scale, unshift);
        }
      }
  });
  return packed;
}

// How the kernels read a packed weight [out, in] (checked to hold it).
Weights weights_of(const at::Tensor& packed, int bits, const float* bias, int64_t out, int64_t in) {
  const Layout layout(out, in, bits);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  return {p, layout.scales(p, 0, 0), layout.unshift(p), bias, layout.blocks, out,
          prefetch_bytes.load(std::memory_order_relaxed), bits};
}

// `rows` activation rows (at least one), each quantized once by prepare(), times a packed weight,
// threads claiming groups of 16 outputs: for wizard_quantized_linear and the fused decode block. About
// 256K products per task, as many int8 weight bytes as the fp32 kernel's 64K per task: small layers
// stay on one thread.
class QuantizedRowProduct : public wizard::RowProduct {
 public:
  QuantizedRowProduct(const Kernel& kernel, const at::Tensor& packed, int bits, const float* bias, int64_t rows,
                      int64_t out, int64_t in)
      : RowProduct(groups_of(out), kGroup, std::max<int64_t>(1, 262144 / (in * rows * kGroup)), 4),
        kernel_(kernel), in_(in), blocks_(blocks_of(in)),
        scratch_(new uint8_t[rows * blocks_ * kActivationBytes]),
        activations_{rows, blocks_, reinterpret_cast<int8_t*>(scratch_.get()),
                     reinterpret_cast<int32_t*>(scratch_.get() + rows * blocks_ * kBlock),
                     reinterpret_cast<float*>(scratch_.get() + rows * blocks_ * (kBlock + 4))},
        weights_(weights_of(packed, bits, bias, out, in)) {}

  bool prepares() const override { return true; }
  void prepare(const float* row, int64_t r) override {
    const Activations one{1, blocks_, activations_.q + r * blocks_ * kBlock, activations_.sum + r * blocks_,
                          activations_.scale + r * blocks_};
    kernel_.prepare(row, in_, one);
    for (int64_t b = 0; b < blocks_; b++) one.scale[b] *= weights_.unshift;
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

std::unique_ptr<wizard::RowProduct> wizard::quantized_row_product(const at::Tensor& packed, const float* bias,
                                                                  int64_t rows, int64_t out, int64_t in) {
  const int bits = bits_of_packed(packed, out, in);
  return std::make_unique<QuantizedRowProduct>(*kernel_for(0), packed, bits, bias, rows, out, in);
}

extern "C" {

// How many bytes ahead of the records being read the kernels prefetch; `bytes` of 0 or more sets it.
int64_t wizard_quantized_prefetch_bytes(int64_t bytes) {
  if (bytes >= 0) prefetch_bytes.store(bytes, std::memory_order_relaxed);
  return prefetch_bytes.load(std::memory_order_relaxed);
}

// Which kernel the widest choice runs on this CPU: 2 AVX-512 VNNI, 1 AVX2, 0 scalar.
int wizard_quantized_kernel_isa() {
  const Kernel* widest = kernel_for(0);
  return widest == &kVnni ? 2 : widest == &kAvx2 ? 1 : 0;
}

// Whether this CPU runs the kernel for `isa` (as in wizard_quantized_linear).
int wizard_quantized_kernel_available(int isa) { return kernel_for(isa) != nullptr; }

// `*packed` = a new tch tensor holding the `bits` (8 or 4) blocks of `weight`, a contiguous fp32 CPU
// matrix of finite values, packed for the kernels, quantized with the code for `isa` (as in
// wizard_quantized_linear; every one gives the same bytes).
int wizard_quantized_quantize(void* weight_handle, int bits, int isa, void** packed_out) {
  return wizard::guarded([&] {
    const auto& w = *static_cast<at::Tensor*>(weight_handle);
    check_bits(bits);
    if (!w.device().is_cpu() || w.scalar_type() != at::kFloat || w.dim() != 2 || !w.is_contiguous())
      throw std::invalid_argument("quantize: expected a contiguous float CPU matrix, got " + describe(w));
    const Kernel* kernel = kernel_for(isa);
    if (!kernel) throw std::invalid_argument("quantize: this CPU has no kernel " + std::to_string(isa));
    *packed_out = new at::Tensor(bits == 8 ? quantize_pack8(w, *kernel) : quantize_pack4(w, *kernel));
  });
}

// `*packed` = the checked parts (values, fp32 scales [out, blocks]) of `bits` blocks packed.
int wizard_quantized_pack(void* values_handle, void* scales_handle, int64_t in, int bits, void** packed_out) {
  return wizard::guarded([&] {
    const auto& values = *static_cast<at::Tensor*>(values_handle);
    const auto& scales = *static_cast<at::Tensor*>(scales_handle);
    check_parts(values, scales, in, bits);
    *packed_out = new at::Tensor(pack(values, scales, in, bits));
  });
}

// `*values`, `*scales` = new tch tensors: the parts a packed weight [out, in] holds.
int wizard_quantized_unpack(void* packed_handle, int64_t out, int64_t in, int bits, void** values_out,
                            void** scales_out) {
  return wizard::guarded([&] {
    const auto& packed = *static_cast<at::Tensor*>(packed_handle);
    check_packed(packed, out, in, bits);
    auto [values, scales] = unpack(packed, out, in, bits);
    *values_out = new at::Tensor(std::move(values));
    *scales_out = new at::Tensor(std::move(scales));
  });
}

int wizard_quantized_rows(void* packed_handle, int64_t out, int64_t in, int bits, void* ids_handle, void** result) {
  return wizard::guarded([&] {
    const auto& packed = *static_cast<at::Tensor*>(packed_handle);
    check_packed(packed, out, in, bits);
    *result = new at::Tensor(rows(packed, out, in, bits, *static_cast<at::Tensor*>(ids_handle)));
  });
}

// `*result` = a new tch tensor holding x @ dequantize(w)^T + bias (bias may be null): the kernel for
// `isa` (0: the widest this CPU runs, 1: AVX2, 2: scalar) for fp32 CPU rows that need no gradient,
// outside autocast (any count: decode, a batch, verification, prefill); otherwise the weight
// dequantized and at::linear.
int wizard_quantized_linear(void* x_handle, void* packed_handle, int64_t out, int64_t in, int bits,
                            void* bias_handle, int isa, void** result) {
  return wizard::guarded([&] {
    const auto& x = *static_cast<at::Tensor*>(x_handle);
    const auto& packed = *static_cast<at::Tensor*>(packed_handle);
    c10::optional<at::Tensor> bias;
    if (bias_handle) bias = *static_cast<at::Tensor*>(bias_handle);
    check_packed(packed, out, in, bits);
    const Kernel* kernel = kernel_for(isa);
    if (!kernel_applies(kernel, x, in, out, bias)) {
      const auto weight = dequantize(packed, out, in, bits).to(x.device(), x.scalar_type());
      *result = new at::Tensor(at::linear(x, weight, bias));
      return;
    }
    const at::Tensor xc = x.contiguous();
    const int64_t rows = xc.numel() / in;
    auto sizes = x.sizes().vec();
    sizes.back() = out;
    auto y = at::empty(sizes, xc.options());
    if (rows > 0 && out > 0) {
      QuantizedRowProduct product(*kernel, packed, bits, bias ? bias->data_ptr<float>() : nullptr, rows, out, in);
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
