// Bindings of the inference kernels (chunked_scan.cpp, mamba2_pointwise.cpp,
// streamed_matmul.cpp, llama_decode.cpp, top_k.cpp, kv_keep.cpp): one extension.
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
torch::Tensor streamed_matmul(torch::Tensor x, torch::Tensor panels, int64_t N);
std::vector<torch::Tensor> llama_decode(
    torch::Tensor x, torch::Tensor cos, torch::Tensor sin, c10::optional<torch::Tensor> mask,
    std::vector<torch::Tensor> cache, std::vector<torch::Tensor> weights, torch::Tensor norm,
    torch::Tensor head, int64_t vocab, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
    int64_t intermediate, double eps, int64_t logits_to_keep, bool return_hidden);

torch::Tensor top_k_rows(torch::Tensor x, int64_t k);
torch::Tensor argmax_rows(torch::Tensor x);
std::vector<torch::Tensor> top_k_probs_rows(torch::Tensor x, int64_t k);
std::vector<torch::Tensor> kv_keep(std::vector<torch::Tensor> cache, std::vector<int64_t> dst,
                                   std::vector<int64_t> src, int64_t length);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("chunked_scan_forward", &chunked_scan_forward,
        "chunked scalar-decay linear recurrence (SSD / linear attention), forward only");
  m.def("causal_conv_silu", &causal_conv_silu,
        "Mamba-2's causal depthwise conv + SiLU continuing a conv state, forward only");
  m.def("gated_rms_norm", &gated_rms_norm, "rms_norm(y * silu(z)) * weight, forward only");
  m.def("streamed_matmul", &streamed_matmul,
        "x @ W for a few rows of x, W packed in column panels and streamed once; row results "
        "independent of M");
  m.def("llama_decode", &llama_decode,
        "LlamaLM's forward for a few tokens in one call (forward only; rows independent)");
  m.def("top_k_rows", &top_k_rows, "indices of each row's k largest entries, by value");
  m.def("argmax_rows", &argmax_rows, "index of each row's largest entry (lowest among equals)");
  m.def("top_k_probs_rows", &top_k_probs_rows,
        "top_k_rows plus the entries' softmax probabilities over their rows");
  m.def("kv_keep", &kv_keep,
        "move a KV cache's accepted slots to consecutive slots in place and crop, every layer");
}
