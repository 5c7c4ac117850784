// The panel kernels' tiles, included once per instruction set inside a namespace that defines
// `Lanes` (vector type, vectors per panel step, loads, stores, the step's loads, broadcast,
// multiply-add), under a matching `#pragma GCC target`. No include guard: it is meant to be
// included more than once. Each output is one lane's chain in k order whatever the instruction set.

// R rows times P panels over steps [k0, k1), adding to the sums in `acc` ([R][P * 16], row stride
// `stride`). The loops are unrolled explicitly: GCC 12 otherwise keeps the accumulators on the
// stack, storing each one every step.
template <int R, int P, typename W>
inline void tile(const float* x, int64_t in, const W* panels, int64_t k0, int64_t k1, float* acc_rows,
                 int64_t stride, bool prefetch) {
  using V = typename Lanes::V;
  constexpr int N = Lanes::kStepVectors * P;
  constexpr int64_t width = kPanel / Lanes::kStepVectors;
  V acc[R][N];
  _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
      _Pragma("GCC unroll 8") for (int v = 0; v < N; v++) acc[r][v] = Lanes::load(acc_rows + r * stride + width * v);
  constexpr int64_t lead = kLead * 4 / sizeof(W);
  for (int64_t k = k0; k < k1; k++) {
    V w[N];
    _Pragma("GCC unroll 8") for (int p = 0; p < P; p++) {
      const W* step = panels + p * in * kPanel + k * kPanel;
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(step + lead), _MM_HINT_T0);
      Lanes::load_step(step, w + Lanes::kStepVectors * p);
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
      const V b = Lanes::broadcast(x + r * in + k);
      _Pragma("GCC unroll 8") for (int v = 0; v < N; v++) acc[r][v] = Lanes::fma(b, w[v], acc[r][v]);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < R; r++)
      _Pragma("GCC unroll 8") for (int v = 0; v < N; v++) Lanes::store(acc_rows + r * stride + width * v, acc[r][v]);
}

// A tile of `rows` rows (of `MaxRows` where there are more) times P panels.
template <int MaxRows, int P, typename W>
inline void tile_of(int rows, const float* x, int64_t in, const W* panels, int64_t k0, int64_t k1, float* acc_rows,
                    int64_t stride, bool prefetch) {
  if constexpr (MaxRows > 1) {
    if (rows < MaxRows) return tile_of<MaxRows - 1, P>(rows, x, in, panels, k0, k1, acc_rows, stride, prefetch);
  }
  tile<MaxRows, P>(x, in, panels, k0, k1, acc_rows, stride, prefetch);
}

// `rows` rows in tiles of at most `MaxRows`, as even as they come (13 rows of 6-row tiles: 4, 4 and
// 5), times P panels over chunks of `chunk` steps: the first tile reads a chunk from memory
// (prefetching where `prefetch`), the others from cache.
template <int MaxRows, int P, typename W>
inline void tiles_over_chunks(int64_t rows, const float* x, int64_t in, const W* panels, int64_t chunk,
                              bool prefetch, float* y, int64_t out) {
  const int64_t tiles = (rows + MaxRows - 1) / MaxRows;
  for (int64_t k0 = 0; k0 < in; k0 += chunk) {
    const int64_t k1 = std::min(in, k0 + chunk);
    for (int64_t t = 0, first = 0; t < tiles; t++) {
      const int64_t last = rows * (t + 1) / tiles;
      tile_of<MaxRows, P>(static_cast<int>(last - first), x + first * in, in, panels, k0, k1, y + first * out, out,
                          prefetch && t == 0);
      first = last;
    }
  }
}

// Output columns [begin, end) (multiples of 16) of `rows` rows over panels of `in` steps, P panels
// at a time and then one by one, rows in tiles of at most `MaxRows`: one tile reads the weights once,
// unchunked; more take chunks of `chunk` steps, the first tile prefetching. Sums add to `y`.
template <int MaxRows, int P, typename W>
inline void tiles_over_panels(int64_t rows, const float* x, int64_t in, const W* panels, int64_t chunk, float* y,
                              int64_t out, int64_t begin, int64_t end) {
  const bool one_tile = rows <= MaxRows;
  const int64_t steps = one_tile ? in : chunk;
  int64_t j = begin;
  for (; j + P * kPanel <= end; j += P * kPanel)
    tiles_over_chunks<MaxRows, P>(rows, x, in, panels + j / kPanel * in * kPanel, steps, !one_tile, y + j, out);
  for (; j < end; j += kPanel)
    tiles_over_chunks<MaxRows, 1>(rows, x, in, panels + j / kPanel * in * kPanel, steps, !one_tile, y + j, out);
}
