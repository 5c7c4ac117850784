// exp over a namespace's `Lanes` (vector_lanes.h), included once per instruction set inside that
// namespace and under a matching `#pragma GCC target`. No include guard: it is meant to be included
// more than once.

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
