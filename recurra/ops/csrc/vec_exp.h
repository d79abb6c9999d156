// exp on a 64-byte vector (rows_gemm.h's Vec), the same operations in every lane: an element's
// result depends on its value only, never on its lane or on how many elements a loop has (a
// library's vector exp with a scalar tail loop does not promise that). Range reduction
// x = n ln2 + r with n = trunc(x / ln2), |r| < ln2, then a Taylor polynomial of r (degree 10 for
// float, 17 for double: below 1e-7 / 1e-16 relative) scaled by 2^n. Inputs below the smallest
// normal's log give that normal's order of magnitude rather than 0 (softmax weights that small
// are noise either way).
#pragma once

#include "rows_gemm.h"

#include <cstdint>

namespace recurra {

// 1 / j!, at compile time
constexpr double inverse_factorial(int j) { return j <= 1 ? 1.0 : inverse_factorial(j - 1) / j; }

template <typename T> struct ExpTraits;
template <> struct ExpTraits<float> {
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int degree = 10, mantissa = 23, bias = 127;
  static constexpr float lo = -87.0f, hi = 88.0f;
  static constexpr float coef(int j) { return static_cast<float>(inverse_factorial(j)); }
};
template <> struct ExpTraits<double> {
  typedef int64_t I __attribute__((vector_size(64)));
  static constexpr int degree = 17, mantissa = 52, bias = 1023;
  static constexpr double lo = -708.0, hi = 709.0;
  static constexpr double coef(int j) { return inverse_factorial(j); }
};

// Degree: the Taylor polynomial's degree (default: full precision; a lower one is faster, e.g.
// 6 gives about 2e-5 relative, enough where the result is a feature rather than an output)
template <typename T, int Degree = ExpTraits<T>::degree>
inline typename Vec<T>::type vexp(typename Vec<T>::type x) {
  using V = typename Vec<T>::type;
  using E = ExpTraits<T>;
  using I = typename E::I;
  const V lo = V{} + T(E::lo), hi = V{} + T(E::hi);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const I n = __builtin_convertvector(x * T(1.4426950408889634), I);
  const V nf = __builtin_convertvector(n, V);
  const V r = (x - nf * T(0.693145751953125)) - nf * T(1.428606820309417232e-6);
  // Horner: sum_{j <= degree} r^j / j!
  V p = V{} + ExpTraits<T>::coef(Degree);
  for (int j = Degree - 1; j >= 0; --j) p = p * r + ExpTraits<T>::coef(j);
  const I bits = (n + E::bias) << E::mantissa;
  return p * reinterpret_cast<const V&>(bits);
}

}  // namespace recurra
