// The few-row kernel's body, included once per instruction set inside a namespace that defines
// `Lanes` (vector type, width, loads, fused multiply-add, lane sum) and under a matching
// `#pragma GCC target`. No include guard: it is meant to be included more than once.

// Up to four input rows against one weight row: R accumulators, each summed across its lanes at the
// end, in an order that does not depend on R.
template <int R>
inline void dots(const float* x, const float* weight_row, float bias, float* y, int64_t in, int64_t out) {
  using V = Lanes::V;
  constexpr int64_t N = Lanes::kWidth;
  V acc[R];
  for (int r = 0; r < R; r++) acc[r] = Lanes::zero();
  const int64_t full = in / N * N;
  for (int64_t i = 0; i < full; i += N) {
    const V wv = Lanes::load(weight_row + i);
    for (int r = 0; r < R; r++) acc[r] = Lanes::fma(Lanes::load(x + r * in + i), wv, acc[r]);
  }
  if (full < in) {
    const V wv = Lanes::load_first(weight_row + full, in - full);
    for (int r = 0; r < R; r++) acc[r] = Lanes::fma(Lanes::load_first(x + r * in + full, in - full), wv, acc[r]);
  }
  for (int r = 0; r < R; r++) y[r * out] = Lanes::sum(acc[r]) + bias;
}

// Output columns [begin, end) for all rows, weight row by weight row: the weight is read once, as one
// sequential stream (what the hardware prefetcher follows best from DRAM), whatever the row count;
// each row stays in L1 while the groups of four input rows meet it.
inline void rows_times_weight(const float* x, int64_t rows, const float* w, const float* bias, float* y, int64_t in,
                              int64_t out, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; j++) {
    const float* weight_row = w + j * in;
    const float b = bias ? bias[j] : 0.0f;
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) dots<4>(x + r * in, weight_row, b, y + r * out + j, in, out);
    switch (rows - r) {
      case 3: dots<3>(x + r * in, weight_row, b, y + r * out + j, in, out); break;
      case 2: dots<2>(x + r * in, weight_row, b, y + r * out + j, in, out); break;
      case 1: dots<1>(x + r * in, weight_row, b, y + r * out + j, in, out); break;
      default: break;
    }
  }
}
