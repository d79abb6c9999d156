// x @ W for a few rows of x (decoding and verifying a handful of tokens), with W streamed from
// memory once. W comes packed in column panels (streamed_matmul.py's pack_panels): panel p holds
// columns [32p, 32p + 32) of W for every k, contiguous, so each panel is one sequential read.
// The threads split the panels. For a panel, the output rows' accumulators stay in registers
// for all of K (up to 14 rows of 32 floats at once); the loop prefetches the panel 48 k-rows
// (6 KB of floats) ahead into L2, which keeps enough reads in flight for one core to stream at
// the memory's pace while it computes several rows (without it, 8 rows read the weight at
// about half the single-row rate on the 2-core machine), and 8 k-rows ahead into L1.
//
// Every output element is one chain of fused multiply-adds over k = 0..K-1, whatever the
// number of rows and threads: a row's result is bitwise the same computed alone or with others.
#include <torch/extension.h>

#include "panel_gemm.h"

// x (M, K) contiguous, panels (P, K, 32) contiguous (W's columns packed, zero-padded to 32 P);
// returns x @ W (M, N), N <= 32 P.
torch::Tensor streamed_matmul(torch::Tensor x, torch::Tensor panels, int64_t N) {
  using recurra::panel::kPanel;
  TORCH_CHECK(x.dim() == 2 && panels.dim() == 3 && panels.size(2) == kPanel &&
                  x.size(1) == panels.size(1),
              "x must be (M, K) and panels (P, K, ", kPanel, ")");
  TORCH_CHECK(N > (panels.size(0) - 1) * kPanel && N <= panels.size(0) * kPanel,
              "N must lie in the last panel");
  TORCH_CHECK(x.is_contiguous() && panels.is_contiguous(), "x and panels must be contiguous");
  TORCH_CHECK(x.scalar_type() == panels.scalar_type(), "x and panels must share a dtype");
  const int64_t M = x.size(0), K = x.size(1);
  auto out = torch::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "streamed_matmul", [&] {
    recurra::panel::gemm<scalar_t>(out.data_ptr<scalar_t>(), N, x.data_ptr<scalar_t>(), K,
                                   panels.data_ptr<scalar_t>(), M, K, N);
  });
  return out;
}
