// The int4 scale search, written once in GCC's vector extensions and included once per instruction
// set inside a namespace, under a matching `#pragma GCC target` and `fp-contract=off` (a fused
// multiply-add would round differently): each instruction set carries the 16-lane vectors in its
// own registers (four SSE, two AVX2, one AVX-512), and all give the same bits. No include guard: it
// is meant to be included more than once.
//
// One block of 32 weights gets int4 values q in [-8, 7] and a scale. Candidate scales max / c (max:
// the block's first value of largest magnitude, c from -8, q4_0's choice, to -6 in steps of 1/4)
// each round the block; each rounding's least-squares scale (sum q v / sum q q) is kept where it
// leaves the smallest squared error. The search runs on the block divided by |max| (values in
// [-1, 1]), so neither tiny nor huge weights overflow it. A zero block gets scale 0 and zeros.
// Quantize time only: the kernels read whatever the scale is.

using Floats16 = float __attribute__((vector_size(64)));
using Ints16 = int32_t __attribute__((vector_size(64)));

// Each lane of every four-lane group set to combine(combine(l0, l1), combine(l2, l3)) of its group
// (for a sum, the order the reference's blocks were summed in).
template <typename Vector, typename Combine>
inline void within_groups(Vector& s, Combine combine) {
  combine(s, __builtin_shuffle(s, Ints16{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
  combine(s, __builtin_shuffle(s, Ints16{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
}
inline void to_group_sums(Floats16& s) {
  within_groups(s, [](Floats16& a, const Floats16& b) { a += b; });
}

// Four blocks (128 weights from `v`, block after block) into 128 values `q` and four `scales`. Block
// k runs in lanes 4k..4k+3 of every vector: lane l of vector i holds its value 4i + l.
inline void search4(const float* v, int8_t* q, float* scales) {
  Floats16 x[kQuads], magnitudes = {};
  for (int i = 0; i < kQuads; i++) {
    for (int k = 0; k < 4; k++) std::memcpy(reinterpret_cast<float*>(&x[i]) + 4 * k, v + k * kBlock + 4 * i, 16);
    const Floats16 a = reinterpret_cast<Floats16>(reinterpret_cast<Ints16>(x[i]) & 0x7FFFFFFF);
    magnitudes = a > magnitudes ? a : magnitudes;
  }
  within_groups(magnitudes, [](Floats16& a, const Floats16& b) { a = b > a ? b : a; });
  // The block's max is its first value of largest magnitude (its sign orients the candidates; a
  // block of NaN, which callers refuse, would have none).
  Ints16 first = Ints16{} + static_cast<int32_t>(kBlock);
  for (int i = kQuads - 1; i >= 0; i--) {
    const Floats16 a = reinterpret_cast<Floats16>(reinterpret_cast<Ints16>(x[i]) & 0x7FFFFFFF);
    first = a == magnitudes ? Ints16{0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3} + 4 * i : first;
  }
  within_groups(first, [](Ints16& a, const Ints16& b) { a = b < a ? b : a; });
  Floats16 signs;
  for (int k = 0; k < 4; k++)
    for (int l = 0; l < 4; l++) signs[4 * k + l] = v[k * kBlock + first[4 * k] % kBlock] < 0.0f ? -1.0f : 1.0f;
  const Floats16 zero = {};
  magnitudes = magnitudes == 0.0f ? zero + 1.0f : magnitudes;  // a zero block searches zeros
  for (int i = 0; i < kQuads; i++) x[i] /= magnitudes;
  // Adding and taking away 1.5 * 2^23 rounds |x| < 2^22 to the nearest integer, ties to even.
  const Floats16 round = zero + 12582912.0f, low = zero - 8.0f, high = zero + 7.0f;
  Floats16 trial[kQuads], best_trial[kQuads], best = zero, best_error = zero + std::numeric_limits<float>::infinity();
  for (int i = 0; i < kQuads; i++) best_trial[i] = zero;
  for (int step = 0; step <= 8; step++) {
    const Floats16 inverse = (-8.0f + 0.25f * static_cast<float>(step)) * signs;
    Floats16 qv = zero, qq = zero;
    for (int i = 0; i < kQuads; i++) {
      const Floats16 r = (x[i] * inverse + round) - round;
      const Floats16 above = low > r ? low : r;
      trial[i] = high < above ? high : above;
      qv += trial[i] * x[i];
      qq += trial[i] * trial[i];
    }
    to_group_sums(qv);
    to_group_sums(qq);
    const Floats16 d = qv / qq;
    Floats16 error = zero;
    for (int i = 0; i < kQuads; i++) {
      const Floats16 e = x[i] - d * trial[i];
      error += e * e;
    }
    to_group_sums(error);
    // A candidate that rounds the whole block to zeros has no scale (qq = 0).
    const Ints16 better = (qq != 0.0f) & (error < best_error);
    best_error = better ? error : best_error;
    best = better ? d : best;
    for (int i = 0; i < kQuads; i++) best_trial[i] = better ? trial[i] : best_trial[i];
  }
  for (int k = 0; k < 4; k++) {
    scales[k] = best[4 * k] * magnitudes[4 * k];
    for (int i = 0; i < kQuads; i++)
      for (int l = 0; l < 4; l++) q[k * kBlock + 4 * i + l] = static_cast<int8_t>(best_trial[i][4 * k + l]);
  }
}

// A row of `in` weights into int4 values (32 a block, zeros past `in`) and block scales, four
// blocks at a time; the last ones read from zeros past `in`, which change neither a block's
// largest magnitude nor its errors.
inline void quantize_row4(const float* row, int64_t in, int8_t* q, float* scales) {
  const int64_t blocks = blocks_of(in);
  for (int64_t b = 0; b < blocks; b += 4) {
    if ((b + 4) * kBlock <= in) {
      search4(row + b * kBlock, q + b * kBlock, scales + b);
      continue;
    }
    float padded[4 * kBlock] = {}, four_scales[4];
    int8_t four[4 * kBlock];
    std::copy(row + b * kBlock, row + in, padded);
    search4(padded, four, four_scales);
    std::copy(four, four + (blocks - b) * kBlock, q + b * kBlock);
    std::copy(four_scales, four_scales + (blocks - b), scales + b);
  }
}
