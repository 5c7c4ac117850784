// The int8 kernel's loops over rows, included once per instruction set inside a namespace
// that defines `dots<R, J>` (R activation rows times J weight rows), under a matching
// `#pragma GCC target`. No include guard: it is meant to be included more than once. Every output
// element is accumulated on its own, so neither the grouping nor the thread split changes a bit of it.

// The last `(last - r) < Rows` activation rows, R at a time for the largest R that fits.
template <int R, int J>
inline void remaining_rows(const Activations& a, const Weights& w, float* y, int64_t r, int64_t last, int64_t j) {
  if constexpr (R > 0) {
    if (last - r == R)
      dots<R, J>(a, r, w, y, j);
    else
      remaining_rows<R - 1, J>(a, w, y, r, last, j);
  }
}

// Activation rows [first, last) against weight rows [j, j + J), Rows at a time: the J weight rows
// stay in L1 while the groups meet them.
template <int Rows, int J>
inline void row_block(const Activations& a, const Weights& w, float* y, int64_t first, int64_t last, int64_t j) {
  int64_t r = first;
  for (; r + Rows <= last; r += Rows) dots<Rows, J>(a, r, w, y, j);
  remaining_rows<Rows - 1, J>(a, w, y, r, last, j);
}

// Output columns [begin, end), J weight rows at a time, for every activation row. Rows go in blocks
// whose quantized records (about 512 KiB: 20 rows of 8192 values) stay in L2 while the columns' weight rows stream past
// them, so a weight is read from memory once per block.
template <int Rows, int J>
inline void rows_times_weight_by(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end) {
  const int64_t block = std::max<int64_t>(Rows, 524288 / (w.blocks * kRecordBytes) / Rows * Rows);
  for (int64_t first = 0; first < a.rows; first += block) {
    const int64_t last = std::min(a.rows, first + block);
    int64_t j = begin;
    for (; j + J <= end; j += J) row_block<Rows, J>(a, w, y, first, last, j);
    for (; j < end; j++) row_block<Rows, 1>(a, w, y, first, last, j);
  }
}
