// The few-row kernel's body, included once per instruction set inside a namespace that defines
// `Lanes` (vector type, width, loads, fused multiply-add, lane sum) and under a matching
// `#pragma GCC target`. No include guard: it is meant to be included more than once.

// R input rows times J weight rows: R*J accumulators, each summed across its lanes at the end.
// One function, so that GCC keeps the accumulators in registers.
template <int R, int J>
inline void dots(const float* x, const float* w, const float* bias, float* y, int64_t in, int64_t out, int64_t j) {
  using V = Lanes::V;
  constexpr int64_t N = Lanes::kWidth;
  V acc[R][J];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < J; c++) acc[r][c] = Lanes::zero();
  const int64_t full = in / N * N;
  // Weight row by weight row, so the weight is read as one sequential stream (what the hardware
  // prefetcher follows best when it comes from DRAM); the few input rows stay in L1.
  for (int c = 0; c < J; c++) {
    const float* row = w + (j + c) * in;
    for (int64_t i = 0; i < full; i += N) {
      V wv = Lanes::load(row + i);
      for (int r = 0; r < R; r++) acc[r][c] = Lanes::fma(Lanes::load(x + r * in + i), wv, acc[r][c]);
    }
  }
  if (full < in) {
    V xv[R];
    for (int r = 0; r < R; r++) xv[r] = Lanes::load_first(x + r * in + full, in - full);
    for (int c = 0; c < J; c++) {
      V wv = Lanes::load_first(w + (j + c) * in + full, in - full);
      for (int r = 0; r < R; r++) acc[r][c] = Lanes::fma(xv[r], wv, acc[r][c]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < J; c++) y[r * out + j + c] = Lanes::sum(acc[r][c]) + (bias ? bias[j + c] : 0.0f);
}

// Output columns [begin, end) for R rows, Lanes::kWeightRows weight rows at a time.
template <int R>
void columns(const float* x, const float* w, const float* bias, float* y, int64_t in, int64_t out, int64_t begin,
             int64_t end) {
  constexpr int J = Lanes::kWeightRows;
  int64_t j = begin;
  for (; j + J <= end; j += J) dots<R, J>(x, w, bias, y, in, out, j);
  for (; j < end; j++) dots<R, 1>(x, w, bias, y, in, out, j);
}

// Rows in groups of four, so the weight is streamed once per four rows.
inline void rows_times_weight(const float* x, int64_t rows, const float* w, const float* bias, float* y, int64_t in,
                              int64_t out, int64_t begin, int64_t end) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) columns<4>(x + r * in, w, bias, y + r * out, in, out, begin, end);
  switch (rows - r) {
    case 3: columns<3>(x + r * in, w, bias, y + r * out, in, out, begin, end); break;
    case 2: columns<2>(x + r * in, w, bias, y + r * out, in, out, begin, end); break;
    case 1: columns<1>(x + r * in, w, bias, y + r * out, in, out, begin, end); break;
    default: break;
  }
}
