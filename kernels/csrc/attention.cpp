// Attention of new positions over each sequence's own KV cache (a decode step or a verification
// pass, alone or in a batch of sequences of different lengths), fp32 on CPU, in one call for all
// sequences, heads and positions. Each (sequence, head, position) is computed by the same code in
// the same order whatever else is in the call, so a position's output depends neither on its
// neighbours in the batch nor on how many positions came in the same call: a k-token verification
// gives the bits of k one-token steps. The heads of a key/value group (all of them, multi-query) go
// through a tile of the cache together, as many to a task as keeps the threads busy, and within a
// task several heads meet each key and value vector at once; a head's arithmetic is the same
// whichever heads share its task. Where head sizes are a multiple of 16, the AVX-512 and AVX2
// kernels give the same bits (the same sums in the same order, exp_kernel.h's exp); elsewhere, and
// without AVX2, a portable loop with libm's exp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention.h"
#include "cpu.h"
#include "guard.h"
#include "vector_lanes.h"

// GCC 12's AVX-512 shuffle and reduction intrinsics read an intentionally undefined register (a
// false positive).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

constexpr int kLanes = 16;

// A key's score is the sum of its 16 lane partials (lane l: query[d] * key[d] for d = l mod 16, in
// order of d) in this tree, which the AVX-512 kernel computes for 16 keys at once with shuffles.
inline float tree_sum(const float* part) {
  float quad[4];
  for (int j = 0; j < 4; j++) {
    const float* p = part + 4 * j;
    quad[j] = (p[0] + p[2]) + (p[1] + p[3]);
  }
  return (quad[0] + quad[1]) + (quad[2] + quad[3]);
}

// scores[t] = scale * (query . keys[t]) for t in [0, count), keys in rows of `dim`.
__attribute__((target_clones("avx2,fma", "default"))) void scores_portable(const float* query, const float* keys,
                                                                          int64_t count, int64_t dim, float scale,
                                                                          float* scores) {
  for (int64_t t = 0; t < count; t++) {
    const float* key = keys + t * dim;
    float part[kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= dim; d += kLanes)
      for (int l = 0; l < kLanes; l++) part[l] += query[d + l] * key[d + l];
    for (; d < dim; d++) part[d % kLanes] += query[d] * key[d];
    scores[t] = tree_sum(part) * scale;
  }
}

#pragma GCC push_options
#pragma GCC target("avx512f")
// tree_sum of 16 vectors of lane partials at once, with shuffles: lane k of the result is
// tree_sum(part[k]).
inline __m512 tree_sums(const __m512* part) {
  // Pairs of lanes within each quad, quads, then halves.
  __m512 pair[8], quad[4], half[2];
  for (int i = 0; i < 8; i++)
    pair[i] = _mm512_add_ps(_mm512_unpacklo_ps(part[2 * i], part[2 * i + 1]),
                            _mm512_unpackhi_ps(part[2 * i], part[2 * i + 1]));
  for (int i = 0; i < 4; i++)
    quad[i] = _mm512_add_ps(_mm512_shuffle_ps(pair[2 * i], pair[2 * i + 1], 0x44),
                            _mm512_shuffle_ps(pair[2 * i], pair[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; i++)
    half[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2 * i], quad[2 * i + 1], 0x88),
                            _mm512_shuffle_f32x4(quad[2 * i], quad[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(half[0], half[1], 0x88), _mm512_shuffle_f32x4(half[0], half[1], 0xDD));
}

// One key's 16 lane partials against one query (in order of d).
inline __m512 partials_avx512(const float* query, const float* key, int64_t dim) {
  __m512 part = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += kLanes)
    part = _mm512_fmadd_ps(_mm512_loadu_ps(query + d), _mm512_loadu_ps(key + d), part);
  return part;
}

// The same sums with AVX-512, `dim` a multiple of 16 (`Dim` where it is fixed at compile time, so
// that the keys' rows are offsets of one pointer; 0 otherwise), for one head: 16 keys' partials
// reduced together, not one key's 16-add chain at a time.
template <int64_t Dim>
void scores_one_head_avx512(const float* query, const float* keys, int64_t count, int64_t runtime_dim, float scale,
                            float* scores) {
  const int64_t dim = Dim != 0 ? Dim : runtime_dim;
  int64_t t = 0;
  for (; t + kLanes <= count; t += kLanes) {
    // The 16 keys' chains side by side (each still in order of d): one key's chain alone waits on
    // every multiply-add's latency.
    __m512 part[kLanes];
    for (int k = 0; k < kLanes; k++) part[k] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += kLanes) {
      const __m512 q = _mm512_loadu_ps(query + d);
      const float* key = keys + t * dim + d;
      for (int k = 0; k < kLanes; k++) part[k] = _mm512_fmadd_ps(q, _mm512_loadu_ps(key + k * dim), part[k]);
    }
    _mm512_storeu_ps(scores + t, _mm512_mul_ps(tree_sums(part), _mm512_set1_ps(scale)));
  }
  for (; t < count; t++) {
    float part[kLanes];
    _mm512_storeu_ps(part, partials_avx512(query, keys + t * dim, dim));
    scores[t] = tree_sum(part) * scale;
  }
}

// The same sums for four heads, four keys at a time: each key vector loaded once for the four
// heads (the one-head loop loads as often as it multiplies, and the loads bound it).
template <int64_t Dim>
void scores_four_heads_avx512(const float* query, int64_t query_stride, const float* keys, int64_t count,
                              int64_t runtime_dim, float scale, float* scores, int64_t scores_stride) {
  const int64_t dim = Dim != 0 ? Dim : runtime_dim;
  constexpr int kHeads = 4, kKeys = 4;
  int64_t t = 0;
  for (; t + kKeys <= count; t += kKeys) {
    __m512 part[kHeads * kKeys];  // head h, key t + k at kKeys * h + k: lane kKeys * h + k of the sums
    for (int i = 0; i < kHeads * kKeys; i++) part[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += kLanes) {
      __m512 q[kHeads];
      for (int h = 0; h < kHeads; h++) q[h] = _mm512_loadu_ps(query + h * query_stride + d);
      for (int k = 0; k < kKeys; k++) {
        const __m512 key = _mm512_loadu_ps(keys + (t + k) * dim + d);
        for (int h = 0; h < kHeads; h++) part[kKeys * h + k] = _mm512_fmadd_ps(q[h], key, part[kKeys * h + k]);
      }
    }
    const __m512 sums = _mm512_mul_ps(tree_sums(part), _mm512_set1_ps(scale));
    _mm_storeu_ps(scores + t, _mm512_extractf32x4_ps(sums, 0));
    _mm_storeu_ps(scores + scores_stride + t, _mm512_extractf32x4_ps(sums, 1));
    _mm_storeu_ps(scores + 2 * scores_stride + t, _mm512_extractf32x4_ps(sums, 2));
    _mm_storeu_ps(scores + 3 * scores_stride + t, _mm512_extractf32x4_ps(sums, 3));
  }
  for (; t < count; t++) {
    for (int h = 0; h < kHeads; h++) {
      float part[kLanes];
      _mm512_storeu_ps(part, partials_avx512(query + h * query_stride, keys + t * dim, dim));
      scores[h * scores_stride + t] = tree_sum(part) * scale;
    }
  }
}

// scores[h * scores_stride + t] = scale * (query_h . keys[t]) for `heads` heads (query_h = query +
// h * query_stride), each head's bits those of scores_portable whichever heads share the call.
template <int64_t Dim>
void scores_heads_avx512_of(const float* query, int64_t query_stride, int64_t heads, const float* keys, int64_t count,
                            int64_t dim, float scale, float* scores, int64_t scores_stride) {
  int64_t h = 0;
  for (; h + 4 <= heads; h += 4)
    scores_four_heads_avx512<Dim>(query + h * query_stride, query_stride, keys, count, dim, scale,
                                  scores + h * scores_stride, scores_stride);
  for (; h < heads; h++)
    scores_one_head_avx512<Dim>(query + h * query_stride, keys, count, dim, scale, scores + h * scores_stride);
}
// scores_heads_avx512_of for the head sizes of common models compiled for their size.
void scores_avx512(const float* query, int64_t query_stride, int64_t heads, const float* keys, int64_t count,
                   int64_t dim, float scale, float* scores, int64_t scores_stride) {
  switch (dim) {
    case 64:
      scores_heads_avx512_of<64>(query, query_stride, heads, keys, count, dim, scale, scores, scores_stride);
      break;
    case 128:
      scores_heads_avx512_of<128>(query, query_stride, heads, keys, count, dim, scale, scores, scores_stride);
      break;
    default:
      scores_heads_avx512_of<0>(query, query_stride, heads, keys, count, dim, scale, scores, scores_stride);
      break;
  }
}
#pragma GCC pop_options

// scores[t] = exp(scores[t] - their largest) for t in [0, count); returns 1 / their sum (summed in
// order of t).
float softmax_weights(float* scores, int64_t count) {
  float max_score = -INFINITY;
  for (int64_t t = 0; t < count; t++) max_score = std::max(max_score, scores[t]);
  float total = 0.0f;
  for (int64_t t = 0; t < count; t++) {
    scores[t] = std::exp(scores[t] - max_score);
    total += scores[t];
  }
  return 1.0f / total;
}

// One head: out = inverse * sum over t of weights[t] * values[t], each lane's sum by (fused, where
// the clone has them) multiply-adds in order of t from zero.
__attribute__((target_clones("avx512f", "avx2,fma", "default"))) void attend_portable(const float* query,
                                                                                const float* keys,
                                                                                const float* values, int64_t count,
                                                                                int64_t dim, float scale,
                                                                                float* scores, float* out) {
  scores_portable(query, keys, count, dim, scale, scores);
  const float inverse = softmax_weights(scores, count);
  for (int64_t d = 0; d < dim; d++) out[d] = 0.0f;
  for (int64_t t = 0; t < count; t++) {
    const float weight = scores[t];
    const float* value = values + t * dim;
    for (int64_t d = 0; d < dim; d++) out[d] += weight * value[d];
  }
  for (int64_t d = 0; d < dim; d++) out[d] *= inverse;
}

#pragma GCC push_options
#pragma GCC target("avx512f")
// sums[h * dim + c] += weights[h * weights_stride + t] * values[t * dim + c] for H heads, t in
// [0, count) and N * 16 columns c, each lane by fused multiply-adds in order of t: the portable
// loop's arithmetic, the sums held in registers and each value vector loaded once for the H heads.
template <int H, int N>
void accumulate_avx512(const float* weights, int64_t weights_stride, const float* values, int64_t count, int64_t dim,
                       float* sums) {
  __m512 sum[H][N];
  for (int h = 0; h < H; h++)
    for (int k = 0; k < N; k++) sum[h][k] = _mm512_loadu_ps(sums + h * dim + k * kLanes);
  for (int64_t t = 0; t < count; t++) {
    __m512 weight[H];
    for (int h = 0; h < H; h++) weight[h] = _mm512_set1_ps(weights[h * weights_stride + t]);
    const float* value = values + t * dim;
    for (int k = 0; k < N; k++) {
      const __m512 v = _mm512_loadu_ps(value + k * kLanes);
      for (int h = 0; h < H; h++) sum[h][k] = _mm512_fmadd_ps(weight[h], v, sum[h][k]);
    }
  }
  for (int h = 0; h < H; h++)
    for (int k = 0; k < N; k++) _mm512_storeu_ps(sums + h * dim + k * kLanes, sum[h][k]);
}

// accumulate_avx512<H, n> for a run-time n in [1, N] (the vectors left in a row).
template <int H, int N>
void accumulate_avx512_up_to(int64_t n, const float* weights, int64_t weights_stride, const float* values,
                             int64_t count, int64_t dim, float* sums) {
  if constexpr (N > 1)
    if (n < N) return accumulate_avx512_up_to<H, N - 1>(n, weights, weights_stride, values, count, dim, sums);
  accumulate_avx512<H, N>(weights, weights_stride, values, count, dim, sums);
}

// The same over every column, `dim` a multiple of 16, for `heads` heads (weights and sums in rows
// of weights_stride and dim): four heads at a time over 64 columns, or one over up to 128.
void accumulate_avx512_heads(const float* weights, int64_t weights_stride, int64_t heads, const float* values,
                             int64_t count, int64_t dim, float* sums) {
  int64_t h = 0;
  for (; h + 4 <= heads; h += 4)
    for (int64_t column = 0; column < dim; column += 4 * kLanes)
      accumulate_avx512_up_to<4, 4>((dim - column) / kLanes, weights + h * weights_stride, weights_stride,
                                    values + column, count, dim, sums + h * dim + column);
  for (; h < heads; h++)
    for (int64_t column = 0; column < dim; column += 8 * kLanes)
      accumulate_avx512_up_to<1, 8>((dim - column) / kLanes, weights + h * weights_stride, weights_stride,
                                    values + column, count, dim, sums + h * dim + column);
}

// softmax_weights with AVX-512: each weight to about an ulp (exp_kernel.h's exp instead of libm's),
// summed as 16 lane partials (lane l: the weights of t = l mod 16, in order of t) then tree_sum. A NaN
// score makes every weight's share NaN, as libm's exp would.
float softmax_weights_avx512(float* scores, int64_t count) {
  using wizard::avx512::exp;
  const int64_t whole = count / kLanes * kLanes;
  const __mmask16 tail = static_cast<__mmask16>((1u << (count - whole)) - 1);
  __m512 largest = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < whole; t += kLanes) largest = _mm512_max_ps(largest, _mm512_loadu_ps(scores + t));
  largest = _mm512_mask_max_ps(largest, tail, largest, _mm512_maskz_loadu_ps(tail, scores + whole));
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(largest));
  __m512 total = _mm512_setzero_ps();
  __mmask16 unordered = 0;
  const auto weigh = [&](__mmask16 lanes, int64_t t) {
    const __m512 shifted = _mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, scores + t), top);
    unordered |= _mm512_mask_cmp_ps_mask(lanes, shifted, shifted, _CMP_UNORD_Q);
    const __m512 weight = _mm512_maskz_mov_ps(lanes, exp(shifted));
    _mm512_mask_storeu_ps(scores + t, lanes, weight);
    total = _mm512_add_ps(total, weight);
  };
  for (int64_t t = 0; t < whole; t += kLanes) weigh(0xFFFF, t);
  if (tail != 0) weigh(tail, whole);
  if (unordered != 0) return NAN;
  float part[kLanes];
  _mm512_storeu_ps(part, total);
  return 1.0f / tree_sum(part);
}

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
// Two keys' vectors of lane partials with each quad's lanes 0 + 2 and 1 + 3 added:
// [a0+a2, b0+b2, a1+a3, b1+b3] in each 128-bit half.
inline __m256 pair_sums_avx2(__m256 a, __m256 b) {
  return _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
}

// Four keys' quad sums from two pair_sums_avx2: [a, b, c, d] in each 128-bit half.
inline __m256 quad_sums_avx2(__m256 ab, __m256 cd) {
  return _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
}

// tree_sum of four keys' 16 lane partials (lanes 0-7 in low[k], 8-15 in high[k]) at once: lane k of
// the result is key k's sum ([quad 0 | quad 1] come from the low halves, [quad 2 | quad 3] from the
// high).
inline __m128 tree_sums_avx2(const __m256* low, const __m256* high) {
  const __m256 first = quad_sums_avx2(pair_sums_avx2(low[0], low[1]), pair_sums_avx2(low[2], low[3]));
  const __m256 second = quad_sums_avx2(pair_sums_avx2(high[0], high[1]), pair_sums_avx2(high[2], high[3]));
  return _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(first), _mm256_extractf128_ps(first, 1)),
                    _mm_add_ps(_mm256_castps256_ps128(second), _mm256_extractf128_ps(second, 1)));
}

// scores_portable's sums with AVX2, `dim` a multiple of 16: four keys' chains side by side, each
// key's 16 lane partials in two vectors, reduced together (the bits of scores_avx512).
void scores_avx2(const float* query, const float* keys, int64_t count, int64_t dim, float scale, float* scores) {
  constexpr int kKeys = 4;
  int64_t t = 0;
  for (; t + kKeys <= count; t += kKeys) {
    __m256 low[kKeys], high[kKeys];
    for (int k = 0; k < kKeys; k++) low[k] = high[k] = _mm256_setzero_ps();
    for (int64_t d = 0; d < dim; d += kLanes) {
      const __m256 query_low = _mm256_loadu_ps(query + d), query_high = _mm256_loadu_ps(query + d + 8);
      const float* key = keys + t * dim + d;
      for (int k = 0; k < kKeys; k++) {
        low[k] = _mm256_fmadd_ps(query_low, _mm256_loadu_ps(key + k * dim), low[k]);
        high[k] = _mm256_fmadd_ps(query_high, _mm256_loadu_ps(key + k * dim + 8), high[k]);
      }
    }
    _mm_storeu_ps(scores + t, _mm_mul_ps(tree_sums_avx2(low, high), _mm_set1_ps(scale)));
  }
  float part[kLanes];
  for (; t < count; t++) {
    __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
    for (int64_t d = 0; d < dim; d += kLanes) {
      low = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), _mm256_loadu_ps(keys + t * dim + d), low);
      high = _mm256_fmadd_ps(_mm256_loadu_ps(query + d + 8), _mm256_loadu_ps(keys + t * dim + d + 8), high);
    }
    _mm256_storeu_ps(part, low);
    _mm256_storeu_ps(part + 8, high);
    scores[t] = tree_sum(part) * scale;
  }
}

// accumulate_avx512 with AVX2 vectors (the same bits).
template <int H, int N>
void accumulate_avx2(const float* weights, int64_t weights_stride, const float* values, int64_t count, int64_t dim,
                     float* sums) {
  __m256 sum[H][N];
  for (int h = 0; h < H; h++)
    for (int k = 0; k < N; k++) sum[h][k] = _mm256_loadu_ps(sums + h * dim + k * 8);
  for (int64_t t = 0; t < count; t++) {
    __m256 weight[H];
    for (int h = 0; h < H; h++) weight[h] = _mm256_set1_ps(weights[h * weights_stride + t]);
    const float* value = values + t * dim;
    for (int k = 0; k < N; k++) {
      const __m256 v = _mm256_loadu_ps(value + k * 8);
      for (int h = 0; h < H; h++) sum[h][k] = _mm256_fmadd_ps(weight[h], v, sum[h][k]);
    }
  }
  for (int h = 0; h < H; h++)
    for (int k = 0; k < N; k++) _mm256_storeu_ps(sums + h * dim + k * 8, sum[h][k]);
}

// accumulate_avx2<H, n> for a run-time n in [1, N] (the vectors left in a row).
template <int H, int N>
void accumulate_avx2_up_to(int64_t n, const float* weights, int64_t weights_stride, const float* values, int64_t count,
                           int64_t dim, float* sums) {
  if constexpr (N > 1)
    if (n < N) return accumulate_avx2_up_to<H, N - 1>(n, weights, weights_stride, values, count, dim, sums);
  accumulate_avx2<H, N>(weights, weights_stride, values, count, dim, sums);
}

// accumulate_avx512_heads with AVX2 vectors: two heads at a time over 32 columns (eight registers of
// sums, each value vector loaded once for both), then any last head alone over up to 64.
void accumulate_avx2_heads(const float* weights, int64_t weights_stride, int64_t heads, const float* values,
                           int64_t count, int64_t dim, float* sums) {
  int64_t h = 0;
  for (; h + 2 <= heads; h += 2)
    for (int64_t column = 0; column < dim; column += 32)
      accumulate_avx2_up_to<2, 4>((dim - column) / 8, weights + h * weights_stride, weights_stride, values + column,
                                  count, dim, sums + h * dim + column);
  for (; h < heads; h++)
    for (int64_t column = 0; column < dim; column += 64)
      accumulate_avx2_up_to<1, 8>((dim - column) / 8, weights + h * weights_stride, weights_stride, values + column,
                                  count, dim, sums + h * dim + column);
}

// scores_avx2 for `heads` heads, one after another.
void scores_avx2_heads(const float* query, int64_t query_stride, int64_t heads, const float* keys, int64_t count,
                       int64_t dim, float scale, float* scores, int64_t scores_stride) {
  for (int64_t h = 0; h < heads; h++)
    scores_avx2(query + h * query_stride, keys, count, dim, scale, scores + h * scores_stride);
}

// exp(score - top) for the eight scores at `at`, in place; whether any was NaN.
inline bool weigh_eight(float* at, __m256 top) {
  const __m256 shifted = _mm256_sub_ps(_mm256_loadu_ps(at), top);
  _mm256_storeu_ps(at, wizard::avx2::exp(shifted));
  return _mm256_movemask_ps(_mm256_cmp_ps(shifted, shifted, _CMP_UNORD_Q)) != 0;
}

// softmax_weights_avx512 with AVX2 vectors (the same bits: the same exp, the same 16 lane partials).
float softmax_weights_avx2(float* scores, int64_t count) {
  float largest = -INFINITY;
  for (int64_t t = 0; t < count; t++) largest = std::max(largest, scores[t]);
  const __m256 top = _mm256_set1_ps(largest);
  __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
  bool unordered = false;
  int64_t t = 0;
  for (; t + kLanes <= count; t += kLanes) {
    unordered |= weigh_eight(scores + t, top);
    unordered |= weigh_eight(scores + t + 8, top);
    low = _mm256_add_ps(low, _mm256_loadu_ps(scores + t));
    high = _mm256_add_ps(high, _mm256_loadu_ps(scores + t + 8));
  }
  if (t < count) {
    // The last partial block through a buffer whose lanes past the end weigh zero.
    const int64_t n = count - t;
    float block[kLanes];
    std::fill_n(block, kLanes, largest);
    std::copy_n(scores + t, n, block);
    unordered |= weigh_eight(block, top);
    unordered |= weigh_eight(block + 8, top);
    std::fill(block + n, block + kLanes, 0.0f);
    std::copy_n(block, n, scores + t);
    low = _mm256_add_ps(low, _mm256_loadu_ps(block));
    high = _mm256_add_ps(high, _mm256_loadu_ps(block + 8));
  }
  if (unordered) return NAN;
  float part[kLanes];
  _mm256_storeu_ps(part, low);
  _mm256_storeu_ps(part + 8, high);
  return 1.0f / tree_sum(part);
}
#pragma GCC pop_options

// Positions per tile: 16 KiB of keys (then of values) stay in L1 while each head of the group meets
// them, so a long cache streams from memory once per task rather than once per head.
int64_t tile_positions(int64_t dim) {
  return std::max<int64_t>(kLanes, 16384 / (dim * static_cast<int64_t>(sizeof(float))) / kLanes * kLanes);
}

// `heads` heads over the same keys and values with one instruction set's scores, softmax weights
// and weighted sums (`dim` a multiple of 16), each tile of the cache read once for all of them; a
// head's bits are the same alone.
template <auto Scores, auto Softmax, auto Accumulate>
void attend_heads_with(const float* query, int64_t query_stride, int64_t heads, const float* keys,
                       const float* values, int64_t count, int64_t dim, float scale, float* scores, float* out) {
  const int64_t tile = tile_positions(dim);
  for (int64_t first = 0; first < count; first += tile)
    Scores(query, query_stride, heads, keys + first * dim, std::min(tile, count - first), dim, scale, scores + first,
           count);
  std::vector<float> inverse(heads);
  for (int64_t h = 0; h < heads; h++) inverse[h] = Softmax(scores + h * count, count);
  std::fill_n(out, heads * dim, 0.0f);
  for (int64_t first = 0; first < count; first += tile)
    Accumulate(scores + first, count, heads, values + first * dim, std::min(tile, count - first), dim, out);
  for (int64_t h = 0; h < heads; h++)
    for (int64_t d = 0; d < dim; d++) out[h * dim + d] *= inverse[h];
}

bool plain_float_cpu(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.layout() == at::kStrided;
}

}  // namespace

namespace wizard {

std::vector<CacheRow> cache_rows(void** key_caches, void** value_caches, const int64_t* lens, int64_t count,
                                 int64_t kv_heads, int64_t dim, int64_t fresh, int64_t batch) {
  std::vector<CacheRow> rows;
  rows.reserve(batch);
  for (int64_t i = 0; i < count; i++) {
    auto& keys = *static_cast<at::Tensor*>(key_caches[i]);
    auto& values = *static_cast<at::Tensor*>(value_caches[i]);
    TORCH_CHECK(plain_float_cpu(keys) && keys.is_contiguous() && keys.dim() == 4 && keys.size(1) == kv_heads &&
                    keys.size(3) == dim && values.sizes() == keys.sizes() && values.is_contiguous() &&
                    plain_float_cpu(values),
                "decode attention: cache ", i, " is not a contiguous fp32 [b, kv_heads, capacity, dim] buffer");
    TORCH_CHECK(lens[i] >= 0 && lens[i] + fresh <= keys.size(2), "decode attention: cache ", i, " holds ", lens[i],
                " of ", keys.size(2), " positions, no room for ", fresh, " more");
    for (int64_t b = 0; b < keys.size(0); b++) {
      const int64_t offset = b * kv_heads * keys.size(2) * dim;
      rows.push_back({keys.data_ptr<float>() + offset, values.data_ptr<float>() + offset, lens[i], keys.size(2)});
    }
  }
  TORCH_CHECK(static_cast<int64_t>(rows.size()) == batch, "decode attention: ", rows.size(), " cached sequences for ",
              batch, " query rows");
  return rows;
}

// For each head h in [0, heads) of one key/value group: out[h * dim, (h + 1) * dim) = the weighted
// sum of values[t] by softmax(scale * query_h . keys[t]) over t in [0, count) (rows of `dim`), where
// query_h = query + h * query_stride. A head's bits depend on nothing but its own inputs (fixed
// orders of summation), whichever heads share the call. `scores` holds heads * count floats of
// scratch.
void attend_heads(const float* query, int64_t query_stride, int64_t heads, const float* keys, const float* values,
                  int64_t count, int64_t dim, float scale, float* scores, float* out) {
  if (dim % kLanes == 0 && wizard::cpu::avx512()) {
    attend_heads_with<scores_avx512, softmax_weights_avx512, accumulate_avx512_heads>(
        query, query_stride, heads, keys, values, count, dim, scale, scores, out);
    return;
  }
  if (dim % kLanes == 0 && wizard::cpu::avx2()) {
    attend_heads_with<scores_avx2_heads, softmax_weights_avx2, accumulate_avx2_heads>(
        query, query_stride, heads, keys, values, count, dim, scale, scores, out);
    return;
  }
  for (int64_t h = 0; h < heads; h++)
    attend_portable(query + h * query_stride, keys, values, count, dim, scale, scores, out + h * dim);
}

float softmax_row(float* scores, int64_t count) {
  if (wizard::cpu::avx512()) return softmax_weights_avx512(scores, count);
  if (wizard::cpu::avx2()) return softmax_weights_avx2(scores, count);
  return softmax_weights(scores, count);
}

void attend_task(const AttentionTasks::Task& task, const CacheRow& row, int64_t dim, const float* query,
                 int64_t query_stride, float scale, std::vector<float>& scores, float* out) {
  const int64_t base = task.group * row.capacity * dim, positions = row.past + task.position + 1;
  scores.resize(task.heads * positions);
  attend_heads(query, query_stride, task.heads, row.keys + base, row.values + base, positions, dim, scale,
               scores.data(), out);
}

AttentionTasks::AttentionTasks(int64_t sequences, int64_t heads, int64_t kv_heads, int64_t fresh, int64_t threads)
    : sequences_(sequences), kv_heads_(kv_heads), fresh_(fresh), group_(heads / kv_heads) {
  const int64_t others = std::max<int64_t>(sequences * kv_heads * fresh, 1);
  const int64_t parts = std::clamp<int64_t>((threads + others - 1) / others, 1, group_);
  chunk_ = (group_ + parts - 1) / parts;
  parts_ = (group_ + chunk_ - 1) / chunk_;
}

AttentionTasks::Task AttentionTasks::at(int64_t i) const {
  const int64_t part = (i / fresh_) % parts_, group = (i / (fresh_ * parts_)) % kv_heads_;
  return {i / (fresh_ * parts_ * kv_heads_), group, group * group_ + part * chunk_,
          std::min(chunk_, group_ - part * chunk_), i % fresh_};
}

}  // namespace wizard

extern "C" {

// For caches i in [0, count): key_caches[i] and value_caches[i] are contiguous `[b_i, kv_heads,
// capacity, dim]` buffers holding lens[i] positions of their b_i sequences. The query rows are the
// caches' sequences in order (sum of b_i = batch). Stores new_keys/new_values (`[batch, kv_heads,
// new, dim]`) at positions lens[i].., then `*result` = attention of `query` (`[batch, heads, new,
// dim]`), position j over positions [0, lens[i] + j], as `[batch, new, heads * dim]`. The caller
// advances the lengths.
int wizard_decode_attention(void* query_handle, void* new_keys_handle, void* new_values_handle, void** key_caches,
                            void** value_caches, const int64_t* lens, int64_t count, double scale, void** result) {
  return wizard::guarded([&] {
    const auto query = static_cast<at::Tensor*>(query_handle)->contiguous();
    const auto new_keys = static_cast<at::Tensor*>(new_keys_handle)->contiguous();
    const auto new_values = static_cast<at::Tensor*>(new_values_handle)->contiguous();
    TORCH_CHECK(query.dim() == 4 && query.size(2) >= 1, "decode attention: query must be [batch, heads, new, dim]");
    const int64_t batch = query.size(0), heads = query.size(1), fresh = query.size(2), dim = query.size(3);
    TORCH_CHECK(new_keys.dim() == 4 && new_keys.size(0) == batch && new_keys.size(2) == fresh &&
                    new_keys.size(3) == dim,
                "decode attention: new keys must be [batch, kv_heads, new, dim]");
    TORCH_CHECK(new_values.sizes() == new_keys.sizes(), "decode attention: new values differ from new keys in shape");
    const int64_t kv_heads = new_keys.size(1);
    TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "decode attention: kv heads must divide heads");
    TORCH_CHECK(plain_float_cpu(query) && plain_float_cpu(new_keys) && plain_float_cpu(new_values),
                "decode attention: fp32 CPU tensors only");

    const auto rows = wizard::cache_rows(key_caches, value_caches, lens, count, kv_heads, dim, fresh, batch);

    const float* new_k = new_keys.data_ptr<float>();
    const float* new_v = new_values.data_ptr<float>();
    for (int64_t r = 0; r < batch; r++) {
      for (int64_t g = 0; g < kv_heads; g++) {
        const int64_t from = (r * kv_heads + g) * fresh * dim;
        const int64_t at = (g * rows[r].capacity + rows[r].past) * dim;
        std::copy_n(new_k + from, fresh * dim, rows[r].keys + at);
        std::copy_n(new_v + from, fresh * dim, rows[r].values + at);
      }
    }

    auto out = at::empty({batch, fresh, heads * dim}, query.options());
    const float* q = query.data_ptr<float>();
    float* o = out.data_ptr<float>();
    const wizard::AttentionTasks tasks(batch, heads, kv_heads, fresh, at::get_num_threads());
    at::parallel_for(0, tasks.count(), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t i = begin; i < end; i++) {
        const wizard::AttentionTasks::Task task = tasks.at(i);
        wizard::attend_task(task, rows[task.sequence], dim,
                            q + ((task.sequence * heads + task.first_head) * fresh + task.position) * dim, fresh * dim,
                            static_cast<float>(scale), scores,
                            o + ((task.sequence * fresh + task.position) * heads + task.first_head) * dim);
      }
    });
    *result = new at::Tensor(std::move(out));
  });
}

// Whether libtorch's SDPA may pick cuDNN; returns the previous setting. cuDNN builds an execution
// plan for every new sequence length (tens to hundreds of milliseconds each), which inference, whose
// lengths grow by one a step, pays on nearly every call.
int wizard_sdpa_allow_cudnn(int allowed) {
  at::Context& context = at::globalContext();
  const bool previous = context.userEnabledCuDNNSDP();
  context.setSDPUseCuDNN(allowed != 0);
  return previous ? 1 : 0;
}
}
