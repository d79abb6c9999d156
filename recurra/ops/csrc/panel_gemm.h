// The few-row product against a weight packed in column panels (see streamed_matmul.cpp): the
// output rows' accumulators stay in registers for all of K while the panel streams past, with
// software prefetches ahead. Shared by streamed_matmul.cpp, llama_decode.cpp and
// recurrent_cells.cpp.
#pragma once

#include <ATen/Parallel.h>

#include "rows_gemm.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace recurra {
namespace panel {

constexpr int64_t kPanel = 32;  // columns per panel (the packing's width)
// k-rows ahead that the stream prefetches: far into L2 (6 KB of floats: enough reads in flight
// for one core to stream at the memory's pace) and near into L1 (1 KB: the multiply-adds of
// several rows then find their weights there). Measured on the 2-core machine, 2026-11-27,
// against one 4 KB prefetch into L2, interleaved: SmolLM2's body products (weights too large
// for the cache) 4 rows 4.9% faster, 8 rows 1.8%, 12 rows 1.3%, one row the same; a draft
// tree's whole verify 1-2%.
constexpr int64_t kPrefetchL2 = 48;
constexpr int64_t kPrefetchL1 = 8;

// out[r, :ncols] = x[r, :] @ panel for r < R, the panel (K, kPanel) contiguous
template <typename T, int R>
inline void panel_rows(T* out, int64_t ldo, const T* x, int64_t ldx, const T* panel,
                       int64_t K, int64_t ncols) {
  using V = typename Vec<T>::type;
  using U = typename Vec<T>::unaligned;
  constexpr int L = Vec<T>::lanes;
  constexpr int NV = kPanel / L;                          // vectors per panel row
  constexpr int kLines = kPanel * sizeof(T) / 64;         // cache lines per panel row
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t k = 0; k < K; ++k) {
    const T* wk = panel + k * kPanel;
    for (int c = 0; c < kLines; ++c) {  // past the panel's end: the next panel (or a no-op)
      __builtin_prefetch(wk + kPrefetchL2 * kPanel + c * (64 / sizeof(T)), 0, 1);
      __builtin_prefetch(wk + kPrefetchL1 * kPanel + c * (64 / sizeof(T)), 0, 3);
    }
    V w[NV];
    for (int v = 0; v < NV; ++v) w[v] = *reinterpret_cast<const U*>(wk + v * L);
    for (int r = 0; r < R; ++r) {
      const T xr = x[r * ldx + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += xr * w[v];
    }
  }
  for (int r = 0; r < R; ++r) {
    if (ncols == kPanel) {
      for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(out + r * ldo + v * L) = acc[r][v];
    } else {  // the last, partial panel
      T tmp[kPanel];
      for (int v = 0; v < NV; ++v) *reinterpret_cast<U*>(tmp + v * L) = acc[r][v];
      std::memcpy(out + r * ldo, tmp, ncols * sizeof(T));
    }
  }
}

// all M rows against one panel, in groups that fit the registers (float: 14 rows x 2 vectors)
template <typename T>
void panel_all_rows(T* out, int64_t ldo, const T* x, int64_t ldx, const T* panel, int64_t M,
                    int64_t K, int64_t ncols) {
  constexpr int G = kPanel / Vec<T>::lanes == 2 ? 14 : 6;
  int64_t m = 0;
  for (; m + G <= M; m += G) panel_rows<T, G>(out + m * ldo, ldo, x + m * ldx, ldx, panel, K, ncols);
  T* o = out + m * ldo;
  const T* xm = x + m * ldx;
  switch (M - m) {
#define RECURRA_ROWS(n) \
    case n: if constexpr (n < G) panel_rows<T, n>(o, ldo, xm, ldx, panel, K, ncols); break;
    RECURRA_ROWS(1) RECURRA_ROWS(2) RECURRA_ROWS(3) RECURRA_ROWS(4) RECURRA_ROWS(5)
    RECURRA_ROWS(6) RECURRA_ROWS(7) RECURRA_ROWS(8) RECURRA_ROWS(9) RECURRA_ROWS(10)
    RECURRA_ROWS(11) RECURRA_ROWS(12) RECURRA_ROWS(13)
#undef RECURRA_ROWS
    default: break;
  }
}


// out (M, N; leading dim ldo) = x (M, K; leading dim ldx) @ W, W as panels (P, K, kPanel);
// the threads split the panels
template <typename T>
void gemm(T* out, int64_t ldo, const T* x, int64_t ldx, const T* panels, int64_t M, int64_t K,
          int64_t N) {
  const int64_t P = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      panel_all_rows<T>(out + p * kPanel, ldo, x, ldx, panels + p * K * kPanel, M, K,
                        std::min<int64_t>(kPanel, N - p * kPanel));
  });
}

}  // namespace panel
}  // namespace recurra
