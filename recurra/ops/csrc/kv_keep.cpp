// Committing an accepted draft path in a KV cache: move the path's slots to consecutive slots
// and drop the rest, for every layer's keys and values in one call (the torch version is two
// indexing ops and a slice per tensor: about 0.4 ms of dispatch for a 30-layer model).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace {

template <typename T>
void move_slots(torch::Tensor& t, const std::vector<int64_t>& dst,
                const std::vector<int64_t>& src) {
  T* p = t.data_ptr<T>();
  const int64_t B = t.size(0), H = t.size(1), D = t.size(3);
  const int64_t s0 = t.stride(0), s1 = t.stride(1), s2 = t.stride(2), s3 = t.stride(3);
  // per (b, h, d) every move, in order (a slot is read before it is overwritten): in the
  // transposed key layout (slots contiguous for each d) the moves of one d share cache lines
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) {
        T* row = p + b * s0 + h * s1 + d * s3;
        for (size_t j = 0; j < dst.size(); ++j) row[dst[j] * s2] = row[src[j] * s2];
      }
}

}  // namespace

// cache: (B, H, S, D) tensors (any strides); moves slot src[j] to dst[j] in place, j in order
// (dst[j] < src[j], both rising), then returns every tensor narrowed to its first `length` slots
std::vector<torch::Tensor> kv_keep(std::vector<torch::Tensor> cache, std::vector<int64_t> dst,
                                   std::vector<int64_t> src, int64_t length) {
  TORCH_CHECK(dst.size() == src.size(), "dst and src must have the same length");
  std::vector<torch::Tensor> out;
  out.reserve(cache.size());
  for (auto& t : cache) {
    TORCH_CHECK(t.dim() == 4 && t.device().is_cpu(), "cache tensors must be CPU (B, H, S, D)");
    TORCH_CHECK(t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kDouble,
                "cache tensors must be float32 or float64");
    const int64_t S = t.size(2);
    TORCH_CHECK(length >= 0 && length <= S, "length must lie in [0, S]");
    for (size_t j = 0; j < dst.size(); ++j)
      TORCH_CHECK(dst[j] >= 0 && dst[j] < src[j] && src[j] < S && (j == 0 || dst[j] > dst[j - 1]),
                  "slots must satisfy 0 <= dst[j] < src[j] < S, rising");
    out.push_back(t.narrow(2, 0, length));
  }
  if (!dst.empty()) {  // the tensors in parallel (each moves its own slots)
    at::parallel_for(0, static_cast<int64_t>(cache.size()), 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        AT_DISPATCH_FLOATING_TYPES(cache[i].scalar_type(), "kv_keep", [&] {
          move_slots<scalar_t>(cache[i], dst, src);
        });
    });
  }
  return out;
}
