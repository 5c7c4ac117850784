// The quantized kernels' loops over rows, included once per instruction set inside a namespace
// that defines `dots<Bits, R, J>` (R activation rows times J groups of 16 outputs of a `Bits` weight), under a matching
// `#pragma GCC target`. No include guard: it is meant to be included more than once. Every output
// element is accumulated on its own, so neither the grouping nor the thread split changes a bit of it.

// The last `(last - r) < Rows` activation rows, R at a time for the largest R that fits.
template <int Bits, int R, int J>
inline void remaining_rows(const Activations& a, const Weights& w, float* y, int64_t r, int64_t last, int64_t g) {
  if constexpr (R > 0) {
    if (last - r == R)
      dots<Bits, R, J>(a, r, w, y, g);
    else
      remaining_rows<Bits, R - 1, J>(a, w, y, r, last, g);
  }
}

// Activation rows [first, last) against groups [g, g + J), Rows at a time: the groups' records stay
// in cache while the rows meet them.
template <int Bits, int Rows, int J>
inline void row_block(const Activations& a, const Weights& w, float* y, int64_t first, int64_t last, int64_t g) {
  int64_t r = first;
  for (; r + Rows <= last; r += Rows) dots<Bits, Rows, J>(a, r, w, y, g);
  remaining_rows<Bits, Rows - 1, J>(a, w, y, r, last, g);
}

// Output groups [begin, end), J at a time, for every activation row. Rows go in blocks whose
// quantized values (about 512 KiB: 51 rows of 8192 values) stay in L2 while the
// groups' records stream past them, so a weight is read from memory once per block.
template <int Bits, int Rows, int J>
inline void rows_times_weight_by(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end) {
  const int64_t block = std::max<int64_t>(Rows, 524288 / (w.blocks * kActivationBytes) / Rows * Rows);
  for (int64_t first = 0; first < a.rows; first += block) {
    const int64_t last = std::min(a.rows, first + block);
    int64_t g = begin;
    for (; g + J <= end; g += J) row_block<Bits, Rows, J>(a, w, y, first, last, g);
    for (; g < end; g++) row_block<Bits, Rows, 1>(a, w, y, first, last, g);
  }
}

// rows_times_weight_by for the weight's format.
template <int Rows, int J>
inline void rows_times_weight_of(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end) {
  if (w.bits == 8)
    rows_times_weight_by<8, Rows, J>(a, w, y, begin, end);
  else
    rows_times_weight_by<4, Rows, J>(a, w, y, begin, end);
}
