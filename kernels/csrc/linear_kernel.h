// The dense kernel's body, included once per instruction set inside a namespace that defines
// `Lanes` (vector type, width, loads, fused multiply-add, lane sum, tile shape) and under a matching
// `#pragma GCC target`. No include guard: it is meant to be included more than once.

// R input rows times J weight rows: R*J accumulators, each summed across its lanes at the end. Every
// accumulator sees the same products in the same order whatever R and J are, so an output element
// does not depend on the tile it was computed in. One function, so that GCC keeps the accumulators
// in registers; the loop loads R + J vectors for R*J multiply-adds. Inputs (`X`) and weights (`W`)
// are what `Lanes` loads: fp32 inputs with fp32 or bf16 weights (widened as they are loaded), or both
// in bf16 for a bf16 dot-product instruction; sums are fp32.
//
// `ahead`, when not null, is the next tile column's weight rows: rows phase, phase + stride, ... of
// them are prefetched alongside (each tile of a column takes its share), so that memory streams
// them while this column computes; with several input rows a column is compute-bound, and without
// this the next column's weights would arrive only when asked for.
template <int R, int J, typename X, typename W>
inline void dots(const X* x, const W* w, const float* bias, float* y, int64_t in, int64_t out, int64_t j,
                 const W* ahead, int phase, int stride) {
  using Acc = decltype(Lanes::zero());
  using V = decltype(Lanes::load_weight(w));
  constexpr int64_t N = Lanes::kWidth;
  Acc acc[R][J];
  for (int r = 0; r < R; r++)
    for (int c = 0; c < J; c++) acc[r][c] = Lanes::zero();
  const W* rows = w + j * in;
  const int64_t full = in / N * N;
  for (int64_t i = 0; i < full; i += N) {
    V wv[J];
    for (int c = 0; c < J; c++) wv[c] = Lanes::load_weight(rows + c * in + i);
    if (ahead)
      for (int c = phase; c < J; c += stride)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + c * in + i), _MM_HINT_T1);
    for (int r = 0; r < R; r++) {
      const auto xv = Lanes::load(x + r * in + i);
      for (int c = 0; c < J; c++) acc[r][c] = Lanes::fma(xv, wv[c], acc[r][c]);
    }
  }
  if (full < in) {
    V wv[J];
    for (int c = 0; c < J; c++) wv[c] = Lanes::load_weight_first(rows + c * in + full, in - full);
    for (int r = 0; r < R; r++) {
      const auto xv = Lanes::load_first(x + r * in + full, in - full);
      for (int c = 0; c < J; c++) acc[r][c] = Lanes::fma(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < J; c++) y[r * out + j + c] = Lanes::sum(acc[r][c]) + (bias ? bias[j + c] : 0.0f);
}

// Input rows [first, last) against weight rows [j, j + J), kRows input rows at a time; the tiles
// share the prefetching of `ahead` (the next weight rows, or null).
template <int J, typename X, typename W>
inline void row_block(const X* x, int64_t first, int64_t last, const W* w, const float* bias, float* y,
                      int64_t in, int64_t out, int64_t j, const W* ahead) {
  constexpr int R = Lanes::kRows;
  static_assert(R == 4, "the remainder below takes up to 3 rows");
  const int tiles = static_cast<int>((last - first + R - 1) / R);
  int tile = 0;
  int64_t r = first;
  for (; r + R <= last; r += R, tile++)
    dots<R, J, X, W>(x + r * in, w, bias, y + r * out, in, out, j, ahead, tile, tiles);
  // The last rows in one tile: each tile reads the weight rows once more.
  switch (last - r) {
    case 3: dots<3, J, X, W>(x + r * in, w, bias, y + r * out, in, out, j, ahead, tile, tiles); break;
    case 2: dots<2, J, X, W>(x + r * in, w, bias, y + r * out, in, out, j, ahead, tile, tiles); break;
    case 1: dots<1, J, X, W>(x + r * in, w, bias, y + r * out, in, out, j, ahead, tile, tiles); break;
    default: break;
  }
}

// Output columns [begin, end) for every input row. Rows go in blocks that stay in L2 while the
// columns' weight rows stream past them, so a weight is read from memory once per block. A block
// holds 128K input values (512 KiB in fp32): 16 rows of a 1B model's widest layer (8192), so a
// verification pass reads every weight once (at 96K, 13 rows read that layer twice).
template <typename X, typename W>
inline void rows_times_weight(const X* x, int64_t rows, const W* w, const float* bias, float* y, int64_t in,
                              int64_t out, int64_t begin, int64_t end) {
  constexpr int J = Lanes::kWeightRows;
  const int64_t block = std::max<int64_t>(Lanes::kRows, 131072 / in / Lanes::kRows * Lanes::kRows);
  for (int64_t first = 0; first < rows; first += block) {
    const int64_t last = std::min(rows, first + block);
    // One row is memory-bound: whether prefetching helps the hardware prefetchers is measured per
    // machine (one_row_prefetch).
    const bool prefetch = last - first > 1 || one_row_prefetch<W>();
    // A row at a time sums each output in the same order as a tile does.
    const bool tiles = last - first > 1 || !one_row_stream<W>();
    int64_t j = begin;
    for (; tiles && j + J <= end; j += J)
      row_block<J, X, W>(x, first, last, w, bias, y, in, out, j, prefetch && j + 2 * J <= end ? w + (j + J) * in : nullptr);
    for (; j < end; j++) row_block<1, X, W>(x, first, last, w, bias, y, in, out, j, nullptr);
  }
}
