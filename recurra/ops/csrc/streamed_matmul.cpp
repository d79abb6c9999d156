// x @ W for a few rows of x (decoding and verifying a handful of tokens), with W (K x N)
// streamed from memory once. The threads split W's rows (K) into contiguous blocks; each reads
// its block eight rows at a time, tile by tile of 256 columns (the tile's slice of those rows
// stays in L1 while every row of x uses it), into its own partial sums, which are added in
// thread order at the end. Each output element is one chain of fused multiply-adds in k order
// per block, whatever the number of rows of x: a row's result does not depend on the rows
// computed with it (for a given thread count).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "rows_gemm.h"

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kBlockK = 8;    // rows of W read together
constexpr int kVecs = 8;          // output vectors updated together (independent FMA chains)
constexpr int64_t kTile = 256;    // output columns per tile: its slice of the kBlockK rows of W
                                  // stays in L1 while every row of x uses it

// acc[m, :] = x[m, k0:k1] @ W[k0:k1, :] for m < M, each element's fused multiply-adds in k
// order; acc has leading dim N, x leading dim K. Rows of W are read kBlockK at a time, in order
// (tile by tile of columns), so the weight streams from memory once.
template <typename T>
void streamed_rows(T* acc, const T* x, const T* W, int64_t M, int64_t K, int64_t N, int64_t k0,
                   int64_t k1) {
  using V = typename recurra::Vec<T>::type;
  using U = typename recurra::Vec<T>::unaligned;
  constexpr int L = recurra::Vec<T>::lanes;
  for (int64_t kb0 = k0; kb0 < k1; kb0 += kBlockK) {
    const int64_t kb = std::min<int64_t>(kBlockK, k1 - kb0);
    const bool first = kb0 == k0;
    const T* w0 = W + kb0 * N;
    for (int64_t n0 = 0; n0 < N; n0 += kTile) {
    const int64_t n1 = std::min(N, n0 + kTile);
    const int64_t n_wide = n0 + (n1 - n0) / (kVecs * L) * (kVecs * L);
    const int64_t n_vec = n0 + (n1 - n0) / L * L;
    for (int64_t m = 0; m < M; ++m) {
      const T* xm = x + m * K + kb0;
      T* am = acc + m * N;
      for (int64_t n = n0; n < n_wide; n += kVecs * L) {
        V a[kVecs];
        for (int v = 0; v < kVecs; ++v)
          a[v] = first ? V{} : V(*reinterpret_cast<U*>(am + n + v * L));
        for (int64_t j = 0; j < kb; ++j) {
          const T xj = xm[j];
          const T* wj = w0 + j * N + n;
          for (int v = 0; v < kVecs; ++v) a[v] += xj * V(*reinterpret_cast<const U*>(wj + v * L));
        }
        for (int v = 0; v < kVecs; ++v) *reinterpret_cast<U*>(am + n + v * L) = a[v];
      }
      for (int64_t n = n_wide; n < n_vec; n += L) {
        V a = first ? V{} : V(*reinterpret_cast<U*>(am + n));
        for (int64_t j = 0; j < kb; ++j) a += xm[j] * V(*reinterpret_cast<const U*>(w0 + j * N + n));
        *reinterpret_cast<U*>(am + n) = a;
      }
      for (int64_t n = n_vec; n < n1; ++n) {
        T a = first ? T(0) : am[n];
        for (int64_t j = 0; j < kb; ++j) a += xm[j] * w0[j * N + n];
        am[n] = a;
      }
    }
    }
  }
}

}  // namespace

// x (M, K), W (K, N), both contiguous; returns x @ W (M, N). The threads split K: each streams
// a contiguous block of W's rows (tile by tile of columns) into its own partial sums, which are
// then added in thread order: a fixed order for a fixed thread count, whatever M.
torch::Tensor streamed_matmul(torch::Tensor x, torch::Tensor W) {
  TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && x.size(1) == W.size(0),
              "x must be (M, K) and W (K, N)");
  TORCH_CHECK(x.is_contiguous() && W.is_contiguous(), "x and W must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = W.size(1);
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                               (K + kBlockK - 1) / kBlockK));
  auto partial = torch::empty({parts, M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "streamed_matmul", [&] {
    const int64_t rows = ((K + parts - 1) / parts + kBlockK - 1) / kBlockK * kBlockK;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    scalar_t* pp = partial.data_ptr<scalar_t>();
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t k0 = std::min(K, p * rows), k1 = std::min(K, k0 + rows);
        scalar_t* out = pp + p * M * N;
        if (k0 == k1) {
          std::fill(out, out + M * N, scalar_t(0));
          continue;
        }
        streamed_rows<scalar_t>(out, xp, wp, M, K, N, k0, k1);
      }
    });
  });
  if (parts == 1) return partial[0];
  auto out = partial[0].clone();
  for (int64_t p = 1; p < parts; ++p) out.add_(partial[p]);
  return out;
}
