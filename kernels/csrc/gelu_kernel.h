// GELU's tanh form over a namespace's `Lanes` and `exp` (vector_lanes.h), included once per
// instruction set inside that namespace and under a matching `#pragma GCC target` (as
// linear_kernel.h is). No include guard: it is meant to be included more than once.

// GELU's tanh form of each lane. (Not a lambda: GCC compiles those without the target's vectors.)
inline Lanes::V gelu_tanh(Lanes::V v) {
  using L = Lanes;
  const auto cube = L::mul(L::mul(v, v), v);
  const auto u = L::mul(L::set1(kSqrt2OverPi), L::fmadd(L::set1(kGeluCubic), cube, v));
  return L::div(v, L::add(L::set1(1.0f), exp(L::mul(L::set1(-2.0f), u))));
}

// y[0, n) = GELU of x[0, n) (y may be x).
inline void gelu_tanh(const float* x, float* y, int64_t n) {
  using L = Lanes;
  int64_t i = 0;
  for (; i + L::kWidth <= n; i += L::kWidth) L::store(y + i, gelu_tanh(L::load(x + i)));
  if (i < n) {
    float tail[L::kWidth] = {};
    std::copy(x + i, x + n, tail);
    L::store(tail, gelu_tanh(L::load(tail)));
    std::copy(tail, tail + (n - i), y + i);
  }
}
