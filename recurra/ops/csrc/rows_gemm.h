// A small register-blocked matrix product for the C++ kernels: rows of the output accumulate
// in registers while the rows of the right-hand matrix stream past (see rows_gemm below). Meant
// for cache-resident tiles (tens to hundreds of rows), where a BLAS call costs more in overhead
// than it saves.
#pragma once

#include <algorithm>
#include <cstdint>

namespace recurra {

constexpr int kRows = 4;  // rows of the output kept in registers at once
constexpr int kVecs = 4;  // vectors of columns per register block

// a 64-byte vector of T (GCC's vector extensions: the compiler lowers it to what the CPU has),
// and its unaligned form for loads and stores
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  typedef T unaligned __attribute__((vector_size(64), aligned(alignof(T))));
  static constexpr int lanes = 64 / sizeof(T);
};

// out[r, 0:W] (+)= sum_{k < K_r} c(r, k) * m[k, 0:W] for r < R (row-major, leading dims
// ldo, ldc, ldm), where c(r, k) = coef[r, k], or coef[k, r] with `coef_t`, times kscale[k]
// when kscale is given. With `lower`, row r only needs k <= r (the rest of coef is zero) and
// the loop stops there for each block of rows. Full blocks of kRows x (kVecs vectors)
// accumulate in registers; the edges take a plain loop.
template <typename T, int kRows = kRows, int kVecs = kVecs>
void rows_gemm(T* out, int64_t ldo, const T* coef, int64_t ldc, const T* m, int64_t ldm,
               int64_t R, int64_t K, int64_t W, bool accumulate, bool lower,
               bool coef_t = false, const T* kscale = nullptr) {
  const int64_t rs = coef_t ? 1 : ldc, ks = coef_t ? ldc : 1;  // strides of c(r, k)
  using V = typename Vec<T>::type;
  using U = typename Vec<T>::unaligned;
  constexpr int L = Vec<T>::lanes;
  constexpr int64_t BW = kVecs * L;
  const int64_t w_full = (W / BW) * BW;
  for (int64_t i0 = 0; i0 < R; i0 += kRows) {
    const int rn = static_cast<int>(std::min<int64_t>(kRows, R - i0));
    const int64_t kend = lower ? std::min<int64_t>(K, i0 + rn) : K;
    if (rn == kRows) {
      for (int64_t w0 = 0; w0 < w_full; w0 += BW) {
        V acc[kRows][kVecs];
        for (int r = 0; r < kRows; ++r)
          for (int v = 0; v < kVecs; ++v)
            acc[r][v] = accumulate ? V(*reinterpret_cast<const U*>(out + (i0 + r) * ldo + w0 + v * L))
                                   : V{} ;
        const T* c0 = coef + i0 * rs;
        for (int64_t k = 0; k < kend; ++k) {
          const T* mk = m + k * ldm + w0;
          const T sk = kscale ? kscale[k] : T(1);
          V mv[kVecs];
          for (int v = 0; v < kVecs; ++v) mv[v] = *reinterpret_cast<const U*>(mk + v * L);
          for (int r = 0; r < kRows; ++r) {
            const T c = c0[r * rs + k * ks] * sk;
            for (int v = 0; v < kVecs; ++v) acc[r][v] += c * mv[v];
          }
        }
        for (int r = 0; r < kRows; ++r)
          for (int v = 0; v < kVecs; ++v)
            *reinterpret_cast<U*>(out + (i0 + r) * ldo + w0 + v * L) = acc[r][v];
      }
    }
    const int64_t w_start = rn == kRows ? w_full : 0;
    if (w_start < W) {  // the edges: a plain loop
      for (int r = 0; r < rn; ++r) {
        T* o = out + (i0 + r) * ldo;
        if (!accumulate)
          for (int64_t w = w_start; w < W; ++w) o[w] = T(0);
        const int64_t kr = lower ? std::min<int64_t>(K, i0 + r + 1) : K;
        for (int64_t k = 0; k < kr; ++k) {
          const T c = coef[(i0 + r) * rs + k * ks] * (kscale ? kscale[k] : T(1));
          const T* mk = m + k * ldm;
#pragma omp simd
          for (int64_t w = w_start; w < W; ++w) o[w] += c * mk[w];
        }
      }
    }
  }
}

}  // namespace recurra
