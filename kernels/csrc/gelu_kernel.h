// GELU's tanh form over a namespace's `Lanes` (AVX-512 or AVX2 vectors of fp32), included once per
// instruction set inside that namespace and under a matching `#pragma GCC target` (as
// linear_kernel.h is). No include guard: it is meant to be included more than once.

// exp(x) to about an ulp (Cephes' expf polynomial), arguments clamped to fp32's finite range: the same
// operations in the same order on either instruction set, so both give the same bits.
inline Lanes::V exp(Lanes::V x) {
  using L = Lanes;
  x = L::min(L::max(x, L::set1(-87.3f)), L::set1(88.7f));
  const auto n = L::round(L::mul(x, L::set1(1.44269504088896341f)));
  auto r = L::fnmadd(n, L::set1(0.693359375f), x);
  r = L::fnmadd(n, L::set1(-2.12194440e-4f), r);
  auto p = L::set1(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = L::fmadd(p, r, L::set1(c));
  p = L::fmadd(p, L::mul(r, r), L::add(r, L::set1(1.0f)));
  return L::scale(p, n);
}

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
