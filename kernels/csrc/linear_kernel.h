// The few-row kernel's body, included once per instruction set inside a namespace that defines
// `Lanes` (vector type, width, loads, fused multiply-add, lane sum) and under a matching
// `#pragma GCC target`. No include guard: it is meant to be included more than once.

// R input rows times J weight rows: R*J accumulators, each summed across its lanes at the end, in an
// order that depends on neither R nor J. One function, so that GCC keeps the accumulators in registers.
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

// Every input row against weight rows [j, j + J), four input rows at a time: the weight rows stay in
// L1 or L2 while the groups meet them, so the weight comes from memory once whatever the row count.
template <int J>
inline void all_rows(const float* x, int64_t rows, const float* w, const float* bias, float* y, int64_t in,
                     int64_t out, int64_t j) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dots<4, J>(x + r * in, w, bias, y + r * out, in, out, j);
  switch (rows - r) {
    case 3: dots<3, J>(x + r * in, w, bias, y + r * out, in, out, j); break;
    case 2: dots<2, J>(x + r * in, w, bias, y + r * out, in, out, j); break;
    case 1: dots<1, J>(x + r * in, w, bias, y + r * out, in, out, j); break;
    default: break;
  }
}

// Output columns [begin, end), Lanes::kWeightRows weight rows at a time.
inline void rows_times_weight(const float* x, int64_t rows, const float* w, const float* bias, float* y, int64_t in,
                              int64_t out, int64_t begin, int64_t end) {
  constexpr int J = Lanes::kWeightRows;
  int64_t j = begin;
  for (; j + J <= end; j += J) all_rows<J>(x, rows, w, bias, y, in, out, j);
  for (; j < end; j++) all_rows<1>(x, rows, w, bias, y, in, out, j);
}
