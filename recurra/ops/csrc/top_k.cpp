// The k largest entries of each row of a few long rows (a language model's logits over its
// vocabulary, k of about 8): indices by value, descending, the lower index first among equal
// values. One pass per row: a vector compare against the current k-th value skips whole
// vectors, and the rare entry that beats it is inserted into a sorted list of k. torch.topk
// sorts far more than it needs here (on the 2-core machine about 0.2 ms per 49152-entry row).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "rows_gemm.h"
#include "vec_exp.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

template <typename T>
void top_k_row(int64_t* out, const T* x, int64_t n, int64_t k) {
  using V = typename recurra::Vec<T>::type;
  using U = typename recurra::Vec<T>::unaligned;
  constexpr int L = recurra::Vec<T>::lanes;
  std::vector<T> val(k);
  std::vector<int64_t> idx(k);
  int64_t size = 0;
  // insert (v, i), i increasing: after the entries >= v (earlier indices win ties)
  auto insert = [&](T v, int64_t i) {
    if (size == k && !(v > val[k - 1])) return;
    int64_t pos = size < k ? size++ : k - 1;
    while (pos > 0 && val[pos - 1] < v) {
      val[pos] = val[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    val[pos] = v;
    idx[pos] = i;
  };
  int64_t i = 0;
  for (; i < n && size < k; ++i) insert(x[i], i);
  for (; i + L <= n; i += L) {
    const V v = *reinterpret_cast<const U*>(x + i);
    const auto above = v > (V{} + val[k - 1]);  // a vector of 0 / -1 (integers)
    bool any = false;
    for (int j = 0; j < L; ++j) any |= above[j] != 0;
    if (any)
      for (int j = 0; j < L; ++j) insert(v[j], i + j);
  }
  for (; i < n; ++i) insert(x[i], i);
  for (int64_t j = 0; j < k; ++j) out[j] = idx[j];
}

// sum of exp(x[i] - shift) for i < n (vector lanes, then a scalar tail); the vector exp has
// degree 6 (about 2e-5 relative: the probabilities are drafting features, not outputs)
template <typename T>
T sum_exp(const T* x, int64_t n, T shift) {
  using V = typename recurra::Vec<T>::type;
  using U = typename recurra::Vec<T>::unaligned;
  constexpr int L = recurra::Vec<T>::lanes;
  V acc = V{};
  int64_t i = 0;
  for (; i + L <= n; i += L) acc += recurra::vexp<T, 6>(*reinterpret_cast<const U*>(x + i) - shift);
  T s = 0;
  for (int j = 0; j < L; ++j) s += acc[j];
  for (; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

}  // namespace

// x (R, n) contiguous, 1 <= k <= n: the indices (R, k) of each row's k largest entries
torch::Tensor top_k_rows(torch::Tensor x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (rows, n)");
  TORCH_CHECK(k >= 1 && k <= x.size(1), "k must lie in [1, n]");
  const int64_t R = x.size(0), n = x.size(1);
  auto out = torch::empty({R, k}, x.options().dtype(torch::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "top_k_rows", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int64_t* op = out.data_ptr<int64_t>();
    at::parallel_for(0, R, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) top_k_row<scalar_t>(op + r * k, xp + r * n, n, k);
    });
  });
  return out;
}

// as top_k_rows, plus each chosen entry's softmax probability over its row (R, k; x's dtype):
// exp(x - max) / sum(exp(x - max)), the sum by a degree-6 vector exp (about 2e-5 relative)
std::vector<torch::Tensor> top_k_probs_rows(torch::Tensor x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous (rows, n)");
  TORCH_CHECK(k >= 1 && k <= x.size(1), "k must lie in [1, n]");
  const int64_t R = x.size(0), n = x.size(1);
  auto out = torch::empty({R, k}, x.options().dtype(torch::kLong));
  auto probs = torch::empty({R, k}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "top_k_probs_rows", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int64_t* op = out.data_ptr<int64_t>();
    scalar_t* pp = probs.data_ptr<scalar_t>();
    at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * n;
        int64_t* idx = op + r * k;
        top_k_row<scalar_t>(idx, row, n, k);
        const scalar_t top = row[idx[0]];
        const scalar_t inv = scalar_t(1) / sum_exp<scalar_t>(row, n, top);
        for (int64_t j = 0; j < k; ++j) pp[r * k + j] = std::exp(row[idx[j]] - top) * inv;
      }
    });
  });
  return {out, probs};
}
