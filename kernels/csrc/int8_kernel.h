// The few-row int8 kernel's loops over rows, included once per instruction set inside a namespace
// that defines `dots<R, J>` (R activation rows times J weight rows), under a matching
// `#pragma GCC target`. No include guard: it is meant to be included more than once. Every output
// element is accumulated on its own, so neither the grouping nor the thread split changes a bit of it.

// The last `rows % Rows` activation rows, R at a time for the largest R that fits.
template <int R, int J>
inline void remaining_rows(const Activations& a, const Weights& w, float* y, int64_t r, int64_t j) {
  if constexpr (R > 0) {
    if (a.rows - r == R)
      dots<R, J>(a, r, w, y, j);
    else
      remaining_rows<R - 1, J>(a, w, y, r, j);
  }
}

// Every activation row against weight rows [j, j + J), Rows at a time: the J weight rows stay in L1
// while the groups meet them, so the weight comes from memory once whatever the row count.
template <int Rows, int J>
inline void all_rows(const Activations& a, const Weights& w, float* y, int64_t j) {
  int64_t r = 0;
  for (; r + Rows <= a.rows; r += Rows) dots<Rows, J>(a, r, w, y, j);
  remaining_rows<Rows - 1, J>(a, w, y, r, j);
}

// Output columns [begin, end), J weight rows at a time.
template <int Rows, int J>
inline void rows_times_weight_by(const Activations& a, const Weights& w, float* y, int64_t begin, int64_t end) {
  int64_t j = begin;
  for (; j + J <= end; j += J) all_rows<Rows, J>(a, w, y, j);
  for (; j < end; j++) all_rows<Rows, 1>(a, w, y, j);
}
