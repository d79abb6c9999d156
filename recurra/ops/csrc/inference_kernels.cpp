// Bindings of the inference kernels (chunked_scan.cpp, mamba2_pointwise.cpp,
// streamed_matmul.cpp): one extension.
#include <torch/extension.h>

#include <vector>

std::vector<torch::Tensor> chunked_scan_forward(
    torch::Tensor x, c10::optional<torch::Tensor> log_a, c10::optional<torch::Tensor> x_scale,
    torch::Tensor B, torch::Tensor C, c10::optional<torch::Tensor> D, torch::Tensor h0,
    c10::optional<torch::Tensor> z0, int64_t chunk, bool elu, double eps);
std::vector<torch::Tensor> causal_conv_silu(torch::Tensor u, torch::Tensor state,
                                            torch::Tensor weight, torch::Tensor bias,
                                            c10::optional<torch::Tensor> lengths);
torch::Tensor gated_rms_norm(torch::Tensor y, torch::Tensor z, torch::Tensor weight, double eps);
torch::Tensor streamed_matmul(torch::Tensor x, torch::Tensor W);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("chunked_scan_forward", &chunked_scan_forward,
        "chunked scalar-decay linear recurrence (SSD / linear attention), forward only");
  m.def("causal_conv_silu", &causal_conv_silu,
        "Mamba-2's causal depthwise conv + SiLU continuing a conv state, forward only");
  m.def("gated_rms_norm", &gated_rms_norm, "rms_norm(y * silu(z)) * weight, forward only");
  m.def("streamed_matmul", &streamed_matmul,
        "x @ W for a few rows of x, W streamed once; row results independent of M");
}
