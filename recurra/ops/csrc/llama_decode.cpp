// LlamaLM's forward for inference calls of a few tokens (a decoding step, a draft tree): the
// whole decoder in one call, forward only, for recurra/models/llama.py (its torch forward is
// the reference this is tested against).
//
// Per layer, on R = B * T rows:
//   h = rms_norm(x) ; qkv = h @ Wqkv ; rotary on q and k ; append k, v to the cache
//   y = attention(q, cache) ; x += y @ Wout
//   h = rms_norm(x) ; gate, up = h @ Wgate_up ; x += (silu(gate) * up) @ Wdown
// then hidden = rms_norm(x) and logits = hidden @ Whead for the kept rows. Products use the
// panel kernel (panel_gemm.h), whose rows do not depend on each other.
//
// A query attends to the keys its mask allows (a tree: the cache, its ancestors, itself) in
// slot order, and the keys it may not see are skipped, not weighted by zero. Everything a row
// computes is then the same sequence of operations whether it runs alone or among others: a
// token's logits are bitwise the same decoded alone (greedy) or verified inside a draft tree,
// which is what makes speculative decoding exactly lossless. Each score is one chain of
// multiply-adds over the head dimension, softmax sums and weighted sums run over the allowed
// keys in order, and exp is our own vector polynomial (vec_exp.h), the same in every lane.
//
// Keys are cached transposed, (B, Hkv, Dh, S) in memory, returned as a (B, Hkv, S, Dh) view:
// the scores of a block of keys take whole vectors (lanes over keys), and every block is read
// once for all the queries of its kv head (its query heads and the call's tokens). A cache in
// the usual layout (the torch forward's, or a compacted one) is transposed on the way in.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "panel_gemm.h"
#include "vec_exp.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

// the sum of a vector's lanes by halves (a fixed tree: the same for every vector)
inline float hsum(recurra::Vec<float>::type v) {
  typedef float V8 __attribute__((vector_size(32)));
  typedef float V4 __attribute__((vector_size(16)));
  const V8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const V4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
inline double hsum(recurra::Vec<double>::type v) {
  typedef double V4 __attribute__((vector_size(32)));
  const V4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (a[0] + a[2]) + (a[1] + a[3]);
}

// sum of x[d]^2 for d < D: whole vectors (unaligned loads: no alignment-dependent split of the
// loop), the lanes in order, then a scalar tail; the same for any row at any address
template <typename T>
inline T sum_squares(const T* x, int64_t D) {
  using V = typename recurra::Vec<T>::type;
  using U = typename recurra::Vec<T>::unaligned;
  constexpr int L = recurra::Vec<T>::lanes;
  const int64_t nv = D / L * L;
  V acc = V{};
  for (int64_t d = 0; d < nv; d += L) {
    const V v = *reinterpret_cast<const U*>(x + d);
    acc += v * v;
  }
  T s = hsum(acc);
  for (int64_t d = nv; d < D; ++d) s += x[d] * x[d];
  return s;
}

// out[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)) for R rows of D
template <typename T>
void rms_norm_rows(T* out, const T* x, const T* w, int64_t R, int64_t D, double eps) {
  for (int64_t r = 0; r < R; ++r) {
    const T* xr = x + r * D;
    const T inv = T(1) / std::sqrt(sum_squares<T>(xr, D) / T(D) + T(eps));
    for (int64_t d = 0; d < D; ++d) out[r * D + d] = w[d] * (xr[d] * inv);
  }
}

// rotary embedding of one head vector v (Dh) in place: v * cos + rotate_half(v) * sin
template <typename T>
inline void rope(T* v, const T* cos, const T* sin, int64_t Dh) {
  const int64_t h = Dh / 2;
  for (int64_t i = 0; i < h; ++i) {
    const T a = v[i], b = v[i + h];
    v[i] = a * cos[i] - b * sin[i];
    v[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}


// out[i][j0 + c] = q[i] . kt[:, j0 + c] for NQ queries and 2 vectors of keys from j0 (kt: Dh
// rows of leading dim ld), the lanes over keys: each score
// is one chain of fused multiply-adds over d = 0..Dh-1, whatever its lane, block or companions.
// Every row of kt read serves all NQ queries.
template <typename T, int NQ>
inline void score_block(T* const* out, const T* const* q, const T* kt, int64_t ld, int64_t Dh,
                        int64_t j0) {
  using V = typename recurra::Vec<T>::type;
  using U = typename recurra::Vec<T>::unaligned;
  constexpr int L = recurra::Vec<T>::lanes;
  V acc[NQ][2];
  for (int i = 0; i < NQ; ++i) acc[i][0] = acc[i][1] = V{};
  for (int64_t d = 0; d < Dh; ++d) {
    const T* row = kt + d * ld + j0;
    const V k0 = *reinterpret_cast<const U*>(row), k1 = *reinterpret_cast<const U*>(row + L);
    for (int i = 0; i < NQ; ++i) {
      const T qd = q[i][d];
      acc[i][0] += qd * k0;
      acc[i][1] += qd * k1;
    }
  }
  for (int i = 0; i < NQ; ++i) {
    *reinterpret_cast<U*>(out[i] + j0) = acc[i][0];
    *reinterpret_cast<U*>(out[i] + j0 + L) = acc[i][1];
  }
}

// score_block for any number of queries, twelve at a time
template <typename T>
void score_blocks(T* const* out, const T* const* q, int64_t nq, const T* kt, int64_t ld,
                  int64_t Dh, int64_t j0) {
  constexpr int G = 12;
  int64_t i = 0;
  for (; i + G <= nq; i += G) score_block<T, G>(out + i, q + i, kt, ld, Dh, j0);
  T* const* s = out + i;
  const T* const* qi = q + i;
  switch (nq - i) {
#define RECURRA_QUERIES(n) \
    case n: score_block<T, n>(s, qi, kt, ld, Dh, j0); break;
    RECURRA_QUERIES(1) RECURRA_QUERIES(2) RECURRA_QUERIES(3) RECURRA_QUERIES(4)
    RECURRA_QUERIES(5) RECURRA_QUERIES(6) RECURRA_QUERIES(7) RECURRA_QUERIES(8)
    RECURRA_QUERIES(9) RECURRA_QUERIES(10) RECURRA_QUERIES(11)
#undef RECURRA_QUERIES
    default: break;
  }
}

// p[i] = exp(p[i] - shift) for i < n, vector by vector (p holds a multiple of the lanes; the
// padding is overwritten); returns the sum of the n results, lane sums in order
template <typename T>
inline T exp_shifted_sum(T* p, int64_t n, T shift) {
  using V = typename recurra::Vec<T>::type;
  using U = typename recurra::Vec<T>::unaligned;
  constexpr int L = recurra::Vec<T>::lanes;
  V acc = V{};
  for (int64_t i = 0; i < n; i += L) {
    for (int64_t j = n; j < i + L; ++j) p[j] = shift;  // the last vector's padding: exp(0)
    V e = recurra::vexp<T>(*reinterpret_cast<U*>(p + i) - shift);
    *reinterpret_cast<U*>(p + i) = e;
    if (i + L > n)
      for (int j = static_cast<int>(n - i); j < L; ++j) e[j] = 0;
    acc += e;
  }
  T s = 0;
  for (int i = 0; i < L; ++i) s += acc[i];
  return s;
}

// out[h][:Dh] = sum_i w[h][i] v[slots[i]] for NH heads sharing the values (rows of v of Dh),
// i in order: each element one chain over i, whatever NH; each row of v read once for all
template <typename T, int NH>
inline void weighted_sum(T* const* out, const T* const* w, const T* v, const int64_t* slots,
                         int64_t n, int64_t Dh) {
  using V = typename recurra::Vec<T>::type;
  using U = typename recurra::Vec<T>::unaligned;
  constexpr int L = recurra::Vec<T>::lanes;
  int64_t d0 = 0;
  for (; d0 + 4 * L <= Dh; d0 += 4 * L) {
    V a[NH][4];
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < 4; ++c) a[h][c] = V{};
    for (int64_t i = 0; i < n; ++i) {
      const T* vi = v + slots[i] * Dh + d0;
      const V v0 = *reinterpret_cast<const U*>(vi), v1 = *reinterpret_cast<const U*>(vi + L),
              v2 = *reinterpret_cast<const U*>(vi + 2 * L),
              v3 = *reinterpret_cast<const U*>(vi + 3 * L);
      for (int h = 0; h < NH; ++h) {
        const T wi = w[h][i];
        a[h][0] += wi * v0;
        a[h][1] += wi * v1;
        a[h][2] += wi * v2;
        a[h][3] += wi * v3;
      }
    }
    for (int h = 0; h < NH; ++h)
      for (int c = 0; c < 4; ++c) *reinterpret_cast<U*>(out[h] + d0 + c * L) = a[h][c];
  }
  for (; d0 + L <= Dh; d0 += L) {
    V a[NH];
    for (int h = 0; h < NH; ++h) a[h] = V{};
    for (int64_t i = 0; i < n; ++i) {
      const V vi = *reinterpret_cast<const U*>(v + slots[i] * Dh + d0);
      for (int h = 0; h < NH; ++h) a[h] += w[h][i] * vi;
    }
    for (int h = 0; h < NH; ++h) *reinterpret_cast<U*>(out[h] + d0) = a[h];
  }
  if (d0 < Dh) {  // the tail: an element-wise update per i (no reduction a loop could split)
    for (int h = 0; h < NH; ++h) {
      for (int64_t d = d0; d < Dh; ++d) out[h][d] = 0;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t d = d0; d < Dh; ++d) out[h][d] += w[h][i] * v[slots[i] * Dh + d];
    }
  }
}

// weighted_sum for any number of heads, four at a time
template <typename T>
void weighted_sums(T* const* out, const T* const* w, int64_t heads, const T* v,
                   const int64_t* slots, int64_t n, int64_t Dh) {
  int64_t h = 0;
  for (; h + 4 <= heads; h += 4) weighted_sum<T, 4>(out + h, w + h, v, slots, n, Dh);
  switch (heads - h) {
    case 1: weighted_sum<T, 1>(out + h, w + h, v, slots, n, Dh); break;
    case 2: weighted_sum<T, 2>(out + h, w + h, v, slots, n, Dh); break;
    case 3: weighted_sum<T, 3>(out + h, w + h, v, slots, n, Dh); break;
    default: break;
  }
}

// a[i] = silu(gate[i]) * up[i] for i < I
template <typename T>
inline void silu_mul(T* a, const T* gate, const T* up, int64_t I) {
  using V = typename recurra::Vec<T>::type;
  using U = typename recurra::Vec<T>::unaligned;
  constexpr int L = recurra::Vec<T>::lanes;
  for (int64_t i = 0; i < I; i += L) {
    V g = V{}, u = V{};
    const int64_t m = std::min<int64_t>(L, I - i);
    if (m == L) {
      g = *reinterpret_cast<const U*>(gate + i);
      u = *reinterpret_cast<const U*>(up + i);
    } else {
      for (int64_t j = 0; j < m; ++j) g[j] = gate[i + j], u[j] = up[i + j];
    }
    const V out = g / (T(1) + recurra::vexp<T>(-g)) * u;
    if (m == L) *reinterpret_cast<U*>(a + i) = out;
    else for (int64_t j = 0; j < m; ++j) a[i + j] = out[j];
  }
}

}  // namespace

// x (B, T, D) the embedded tokens; cos, sin (B, T, Dh) at their positions; mask: bool
// (B or 1, T, S + T) or empty (causal: row t sees slots <= S + t); cache: per layer k, v
// (B, Hkv, S, Dh) (any strides; empty list: S = 0); weights: per layer norm_attn (D), qkv
// panels, out panels, norm_mlp (D), gate_up panels, down panels. Returns [logits (B, keep, V),
// hidden (B, T, D) or empty, then per layer the new k, v (B, Hkv, S + T, Dh)].
std::vector<torch::Tensor> llama_decode(
    torch::Tensor x, torch::Tensor cos, torch::Tensor sin, c10::optional<torch::Tensor> mask,
    std::vector<torch::Tensor> cache, std::vector<torch::Tensor> weights, torch::Tensor norm,
    torch::Tensor head, int64_t vocab, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
    int64_t intermediate, double eps, int64_t logits_to_keep, bool return_hidden) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "x must be a contiguous (B, T, D)");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2);
  const int64_t H = n_heads, Hkv = n_kv_heads, Dh = head_dim, I = intermediate;
  TORCH_CHECK(weights.size() % 6 == 0, "weights: 6 per layer");
  const int64_t L = static_cast<int64_t>(weights.size()) / 6;
  TORCH_CHECK(cache.empty() || static_cast<int64_t>(cache.size()) == 2 * L,
              "cache: k and v per layer, or none");
  const int64_t S = cache.empty() ? 0 : cache[0].size(2);
  TORCH_CHECK(cos.sizes() == torch::IntArrayRef({B, T, Dh}) && cos.is_contiguous() &&
                  sin.sizes() == cos.sizes() && sin.is_contiguous(),
              "cos and sin must be contiguous (B, T, Dh)");
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_mask)
    TORCH_CHECK(mask->scalar_type() == torch::kBool && mask->dim() == 3 &&
                    (mask->size(0) == 1 || mask->size(0) == B) && mask->size(1) == T &&
                    mask->size(2) == S + T && mask->is_contiguous(),
                "mask must be a contiguous bool (B or 1, T, S + T)");
  TORCH_CHECK(H > 0 && Hkv > 0 && H % Hkv == 0, "n_kv_heads must divide n_heads");
  const int64_t R = B * T, Q = (H + 2 * Hkv) * Dh, group = H / Hkv;
  // the shapes the loops below index by: the cache and every weight (panels: (P, K, 32))
  auto panels = [](int64_t K, int64_t N) {
    return std::vector<int64_t>{(N + recurra::panel::kPanel - 1) / recurra::panel::kPanel, K,
                                recurra::panel::kPanel};
  };
  const std::vector<int64_t> kv_shape{B, Hkv, S, Dh};
  const std::vector<std::vector<int64_t>> layer_shapes{
      {D}, panels(D, Q), panels(H * Dh, D), {D}, panels(D, 2 * I), panels(I, D)};
  for (const auto& c : cache)
    TORCH_CHECK(c.sizes() == torch::IntArrayRef(kv_shape) && c.scalar_type() == x.scalar_type(),
                "cache tensors must be (B, n_kv_heads, S, head_dim) = ", kv_shape, " of x's dtype");
  for (int64_t i = 0; i < 6 * L; ++i)
    TORCH_CHECK(weights[i].sizes() == torch::IntArrayRef(layer_shapes[i % 6]) &&
                    weights[i].is_contiguous() && weights[i].scalar_type() == x.scalar_type(),
                "weight ", i % 6, " of layer ", i / 6, " must be a contiguous ",
                layer_shapes[i % 6], " of x's dtype, got ", weights[i].sizes());
  TORCH_CHECK(norm.sizes() == torch::IntArrayRef({D}) && norm.is_contiguous() &&
                  head.sizes() == torch::IntArrayRef(panels(D, vocab)) && head.is_contiguous(),
              "norm must be (D) and head the (D, vocab) panels");
  const int64_t keep = logits_to_keep > 0 ? std::min(logits_to_keep, T) : T;
  auto opts = x.options();
  std::vector<torch::Tensor> out;
  out.reserve(2 + 2 * L);
  auto logits = torch::empty({B, keep, vocab}, opts);
  auto xs = x.clone();  // the residual stream
  std::vector<torch::Tensor> new_cache;
  new_cache.reserve(2 * L);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "llama_decode", [&] {
    using T_ = scalar_t;
    auto h = torch::empty({R, std::max(D, I)}, opts);
    auto qkv = torch::empty({R, Q}, opts);
    auto y = torch::empty({R, H * Dh}, opts);
    auto gu = torch::empty({R, 2 * I}, opts);
    auto tmp = torch::empty({R, D}, opts);
    T_* xp = xs.data_ptr<T_>();
    T_* hp = h.data_ptr<T_>();
    T_* qp = qkv.data_ptr<T_>();
    T_* yp = y.data_ptr<T_>();
    T_* gp = gu.data_ptr<T_>();
    T_* tp = tmp.data_ptr<T_>();
    const T_* cp = cos.data_ptr<T_>();
    const T_* sp = sin.data_ptr<T_>();
    const bool* mp = has_mask ? mask->data_ptr<bool>() : nullptr;
    const int64_t mask_b = has_mask && mask->size(0) == B ? T * (S + T) : 0;
    const T_ scale = T_(1) / std::sqrt(T_(Dh));
    for (int64_t l = 0; l < L; ++l) {
      const T_* w_norm_attn = weights[6 * l].data_ptr<T_>();
      const T_* w_qkv = weights[6 * l + 1].data_ptr<T_>();
      const T_* w_out = weights[6 * l + 2].data_ptr<T_>();
      const T_* w_norm_mlp = weights[6 * l + 3].data_ptr<T_>();
      const T_* w_gu = weights[6 * l + 4].data_ptr<T_>();
      const T_* w_down = weights[6 * l + 5].data_ptr<T_>();
      // attention block: norm, qkv, rotary
      rms_norm_rows<T_>(hp, xp, w_norm_attn, R, D, eps);
      recurra::panel::gemm<T_>(qp, Q, hp, D, w_qkv, R, D, Q);
      for (int64_t r = 0; r < R; ++r) {
        const T_* c = cp + r * Dh;
        const T_* s = sp + r * Dh;
        for (int64_t hd = 0; hd < H + Hkv; ++hd) rope<T_>(qp + r * Q + hd * Dh, c, s, Dh);
      }
      // the new cache: the old slots, then this call's keys and values. Keys are stored
      // transposed, (B, Hkv, Dh, S + T) in memory (returned as that storage's (S + T, Dh)
      // view), so that a query's scores run with the vector lanes over keys; values row-major.
      const int64_t ST = S + T;
      constexpr int64_t Lv = recurra::Vec<T_>::lanes;
      // slack of four vectors (zeros): the score loop's last block may read past the last row
      auto k_store = torch::empty({B * Hkv * Dh * ST + 4 * Lv}, opts);
      k_store.narrow(0, B * Hkv * Dh * ST, 4 * Lv).zero_();
      auto k_t = k_store.narrow(0, 0, B * Hkv * Dh * ST).view({B, Hkv, Dh, ST});
      auto v_new = torch::empty({B, Hkv, ST, Dh}, opts);
      if (S) {
        const auto& k_old = cache[2 * l];
        if (k_old.stride(2) == 1 && k_old.stride(3) >= S) {  // our own transposed layout
          const T_* src = k_old.data_ptr<T_>();
          T_* dst = k_t.data_ptr<T_>();
          for (int64_t b = 0; b < B; ++b)
            for (int64_t g = 0; g < Hkv; ++g)
              for (int64_t d = 0; d < Dh; ++d)
                std::memcpy(dst + ((b * Hkv + g) * Dh + d) * ST,
                            src + b * k_old.stride(0) + g * k_old.stride(1) + d * k_old.stride(3),
                            S * sizeof(T_));
        } else {
          k_t.narrow(3, 0, S).copy_(k_old.transpose(2, 3));
        }
        v_new.narrow(2, 0, S).copy_(cache[2 * l + 1]);
      }
      T_* kp = k_t.data_ptr<T_>();
      T_* vp = v_new.data_ptr<T_>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t)
          for (int64_t g = 0; g < Hkv; ++g) {
            const T_* row = qp + (b * T + t) * Q;
            for (int64_t d = 0; d < Dh; ++d)
              kp[((b * Hkv + g) * Dh + d) * ST + S + t] = row[(H + g) * Dh + d];
            std::copy(row + (H + Hkv + g) * Dh, row + (H + Hkv + g + 1) * Dh,
                      vp + ((b * Hkv + g) * ST + S + t) * Dh);
          }
      // attention scores of every query against every slot: one task per (batch row, kv
      // head, block of keys), each block of keys read once for all the queries sharing it
      const int64_t KB = 2 * Lv, nkb = (ST + KB - 1) / KB, lds = nkb * KB;
      auto scores = torch::empty({R * H, lds}, opts);
      T_* sp_scores = scores.data_ptr<T_>();
      at::parallel_for(0, B * Hkv * nkb, 1, [&](int64_t begin, int64_t end) {
        std::vector<const T_*> qs(T * group);
        std::vector<T_*> rows(T * group);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / (Hkv * nkb), g = task / nkb % Hkv, j0 = task % nkb * KB;
          for (int64_t t = 0; t < T; ++t)
            for (int64_t i = 0; i < group; ++i) {
              const int64_t r = b * T + t, h = g * group + i;
              qs[t * group + i] = qp + r * Q + h * Dh;
              rows[t * group + i] = sp_scores + (r * H + h) * lds;
            }
          score_blocks<T_>(rows.data(), qs.data(), T * group, kp + (b * Hkv + g) * Dh * ST, ST,
                           Dh, j0);
        }
      });
      // softmax and values: one task per (row, kv head); the keys the row may see, in slot
      // order, for each of the kv head's query heads
      at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
        std::vector<int64_t> slots(ST);
        std::vector<T_> p(group * (ST + Lv));
        std::vector<T_*> outs(group), ws(group);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t r = task / Hkv, g = task % Hkv, b = r / T, t = r % T;
          int64_t n = 0;
          if (mp) {
            const bool* m = mp + b * mask_b + t * ST;
            for (int64_t j = 0; j < ST; ++j) {  // branch-free compaction
              slots[n] = j;
              n += m[j];
            }
          } else {
            n = S + t + 1;
            for (int64_t j = 0; j < n; ++j) slots[j] = j;
          }
          int64_t run = 0;  // slots[:run] == 0..run-1 (the cache prefix, usually)
          while (run < n && slots[run] == run) ++run;
          for (int64_t i = 0; i < group; ++i) {
            const int64_t hd = g * group + i;
            outs[i] = yp + r * H * Dh + hd * Dh;
            ws[i] = p.data() + i * (ST + Lv);
          }
          if (!n) {
            for (int64_t i = 0; i < group; ++i) std::fill(outs[i], outs[i] + Dh, T_(0));
            continue;
          }
          std::vector<T_> inv(group);
          for (int64_t i = 0; i < group; ++i) {
            const T_* sc = sp_scores + (r * H + g * group + i) * lds;
            T_* pi = ws[i];
            for (int64_t j = 0; j < run; ++j) pi[j] = sc[j] * scale;
            for (int64_t j = run; j < n; ++j) pi[j] = sc[slots[j]] * scale;
            T_ mx = -std::numeric_limits<T_>::infinity();
            for (int64_t j = 0; j < n; ++j) mx = std::max(mx, pi[j]);
            inv[i] = T_(1) / exp_shifted_sum<T_>(pi, n, mx);
          }
          weighted_sums<T_>(outs.data(), const_cast<const T_* const*>(ws.data()), group,
                            vp + (b * Hkv + g) * ST * Dh, slots.data(), n, Dh);
          for (int64_t i = 0; i < group; ++i)
            for (int64_t d = 0; d < Dh; ++d) outs[i][d] *= inv[i];
        }
      });
      recurra::panel::gemm<T_>(tp, D, yp, H * Dh, w_out, R, H * Dh, D);
      for (int64_t i = 0; i < R * D; ++i) xp[i] += tp[i];
      // MLP block
      rms_norm_rows<T_>(hp, xp, w_norm_mlp, R, D, eps);
      recurra::panel::gemm<T_>(gp, 2 * I, hp, D, w_gu, R, D, 2 * I);
      for (int64_t r = 0; r < R; ++r) {
        silu_mul<T_>(hp + r * I, gp + r * 2 * I, gp + r * 2 * I + I, I);
      }
      recurra::panel::gemm<T_>(tp, D, hp, I, w_down, R, I, D);
      for (int64_t i = 0; i < R * D; ++i) xp[i] += tp[i];
      new_cache.push_back(k_t.transpose(2, 3));
      new_cache.push_back(v_new);
    }
    // the final norm (every row: the hidden states) and the output head (the kept rows)
    auto hidden = torch::empty({B, T, D}, opts);
    rms_norm_rows<T_>(hidden.data_ptr<T_>(), xp, norm.data_ptr<T_>(), R, D, eps);
    auto kept = keep == T ? hidden : hidden.narrow(1, T - keep, keep).contiguous();
    recurra::panel::gemm<T_>(logits.data_ptr<T_>(), vocab, kept.data_ptr<T_>(), D,
                             head.data_ptr<T_>(), B * keep, D, vocab);
    out.push_back(logits);
    out.push_back(return_hidden ? hidden : torch::Tensor());
  });
  for (auto& c : new_cache) out.push_back(c);
  return out;
}
