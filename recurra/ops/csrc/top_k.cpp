// The k largest entries of each row of a few long rows (a language model's logits over its
// vocabulary, k of about 8): indices by value, descending, the lower index first among equal
// values. One pass per row: the lane-wise maximum of four vectors compared against the current
// k-th value skips all four at once, and the rare entry that beats it is inserted into a sorted
// list of k. torch.topk sorts far more than it needs here (on the 2-core machine about 0.2 ms
// per 49152-entry row, against 23 us). argmax_rows: one lane-parallel pass per row.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "rows_gemm.h"
#include "vec_exp.h"

#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// whether some lane of v is > t (false for NaN lanes)
template <typename T>
inline bool any_above(typename recurra::Vec<T>::type v, T t) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4)
    return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(v), _mm512_set1_ps(t), _CMP_GT_OQ) != 0;
  else
    return _mm512_cmp_pd_mask(reinterpret_cast<__m512d>(v), _mm512_set1_pd(t), _CMP_GT_OQ) != 0;
#else
  const auto above = v > t;  // a vector of 0 / -1 (integers)
  bool any = false;
  for (int j = 0; j < recurra::Vec<T>::lanes; ++j) any |= above[j] != 0;
  return any;
#endif
}

// the index of x's largest entry, the lowest among equal maxima (for rows without NaN, as
// recurra/ops/top_k.py says): each lane keeps its running maximum and the index where it first
// reached it, then the lanes are reduced (largest value, lowest index among equals)
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  using V = typename recurra::Vec<T>::type;
  using U = typename recurra::Vec<T>::unaligned;
  constexpr int L = recurra::Vec<T>::lanes;
  using I = decltype(V{} > V{});  // lanes of indices: int32 for float, int64 for double
  int64_t best_i = 0;
  T best = x[0];
  int64_t i = 0;
  if (n >= L) {
    V m = *reinterpret_cast<const U*>(x);
    I at, idx;
    for (int j = 0; j < L; ++j) at[j] = idx[j] = j;
    for (i = L; i + L <= n; i += L) {
      idx += L;
      const V v = *reinterpret_cast<const U*>(x + i);
      const auto up = v > m;
      m = up ? v : m;
      at = up ? idx : at;
    }
    best = m[0], best_i = at[0];
    for (int j = 1; j < L; ++j)
      if (m[j] > best || (m[j] == best && at[j] < best_i)) best = m[j], best_i = at[j];
  }
  for (; i < n; ++i)
    if (x[i] > best) best = x[i], best_i = i;
  return best_i;
}

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
  // four vectors at a time: their lane-wise maximum against the current k-th value skips the
  // block (the usual case once the list holds large entries); a NaN is never inserted
  for (; i + 4 * L <= n; i += 4 * L) {
    const V v0 = *reinterpret_cast<const U*>(x + i), v1 = *reinterpret_cast<const U*>(x + i + L);
    const V v2 = *reinterpret_cast<const U*>(x + i + 2 * L);
    const V v3 = *reinterpret_cast<const U*>(x + i + 3 * L);
    const V a = v0 > v1 ? v0 : v1, b = v2 > v3 ? v2 : v3;
    if (!any_above<T>(a > b ? a : b, val[k - 1])) continue;
    for (int j = 0; j < 4 * L; ++j) insert(x[i + j], i + j);
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

// x (R, n) contiguous, n >= 1: the index (R) of each row's largest entry, the lowest among equal
// maxima (what top_k_rows(x, 1) gives, in a lane-parallel pass)
torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) >= 1,
              "x must be a contiguous (rows, n) with n >= 1");
  const int64_t R = x.size(0), n = x.size(1);
  auto out = torch::empty({R}, x.options().dtype(torch::kLong));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "argmax_rows", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int64_t* op = out.data_ptr<int64_t>();
    at::parallel_for(0, R, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) op[r] = argmax_row<scalar_t>(xp + r * n, n);
    });
  });
  return out;
}
