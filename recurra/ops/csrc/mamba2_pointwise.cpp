// Mamba-2's per-token passes around the scan, fused for inference (no autograd):
//
// - causal_conv_silu: silu(bias + sum_i w[:, i] * u_{t - (k-1) + i}) over the sequence that
//   continues the conv state (the last k-1 inputs), in one pass, with the new conv state (each
//   row's last k-1 real inputs, by `lengths` when given). The torch ops it replaces: cat, k
//   multiply-adds and a SiLU, each a pass over a (B, T, C) tensor (recurra.layers.mamba2).
// - gated_rms_norm: rms_norm(y * silu(z)) * weight, per row of D values, in one pass.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T>
inline T silu(T v) {
  return v / (T(1) + std::exp(-v));
}

template <typename T>
void conv_kernel(const torch::Tensor& u, const torch::Tensor& state, const torch::Tensor& w_t,
                 const torch::Tensor& bias, torch::Tensor& out) {
  const int64_t nb = u.size(0), T_len = u.size(1), C = u.size(2), k = w_t.size(0);
  const T* up = u.data_ptr<T>();
  const T* sp = state.data_ptr<T>();
  const T* wp = w_t.data_ptr<T>();
  const T* bp = bias.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t us0 = u.stride(0), us1 = u.stride(1);
  at::parallel_for(0, nb * T_len, 16, [&](int64_t begin, int64_t end) {
    std::vector<const T*> rows(k);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T_len, t = r % T_len;
      for (int64_t i = 0; i < k; ++i) {  // input row for tap i: step t - (k-1) + i
        const int64_t s = t - (k - 1) + i;
        rows[i] = s < 0 ? sp + (b * (k - 1) + (k - 1 + s)) * C : up + b * us0 + s * us1;
      }
      T* o = op + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = bp[c];
      for (int64_t i = 0; i < k; ++i) {
        const T* in = rows[i];
        const T* wi = wp + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] += wi[c] * in[c];
      }
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = silu(o[c]);
    }
  });
}

template <typename T>
void norm_kernel(const torch::Tensor& y, const torch::Tensor& z, const torch::Tensor& weight,
                 double eps, torch::Tensor& out) {
  const int64_t rows = y.size(0) * y.size(1), D = y.size(2), T_len = y.size(1);
  const T* yp = y.data_ptr<T>();
  const T* zp = z.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t zs0 = z.stride(0), zs1 = z.stride(1);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* yr = yp + r * D;
      const T* zr = zp + (r / T_len) * zs0 + (r % T_len) * zs1;
      T* o = op + r * D;
      T ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < D; ++c) {
        const T g = yr[c] * silu(zr[c]);
        o[c] = g;
        ss += g * g;
      }
      const T scale = T(1) / std::sqrt(ss / T(D) + static_cast<T>(eps));
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) o[c] = o[c] * scale * wp[c];
    }
  });
}

}  // namespace

// u (b, T, C) with a unit last stride (rows may be strided: a slice of the in-projection);
// state (b, k-1, C); weight (C, k); bias (C); lengths (b,) or undefined.
// Returns silu(conv) (b, T, C) and the new state (b, k-1, C).
std::vector<torch::Tensor> causal_conv_silu(torch::Tensor u, torch::Tensor state,
                                            torch::Tensor weight, torch::Tensor bias,
                                            c10::optional<torch::Tensor> lengths) {
  TORCH_CHECK(u.dim() == 3 && u.stride(2) == 1, "u must be (b, T, C) with a unit last stride");
  const int64_t k = weight.size(1);
  TORCH_CHECK(state.size(1) == k - 1, "the conv state must hold k - 1 steps");
  state = state.contiguous();
  auto w_t = weight.t().contiguous();
  bias = bias.contiguous();
  auto out = torch::empty({u.size(0), u.size(1), u.size(2)}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "causal_conv_silu", [&] {
    conv_kernel<scalar_t>(u, state, w_t, bias, out);
  });
  // the new state: each row's last k-1 inputs of [state, u] (by its length when given)
  const int64_t nb = u.size(0), T_len = u.size(1);
  auto new_state = torch::empty_like(state);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t len = lengths ? lengths->select(0, b).item<int64_t>() : T_len;
    for (int64_t i = 0; i < k - 1; ++i) {
      const int64_t s = len - (k - 1) + i;  // step of [state, u] counted from u's start
      new_state.select(0, b).select(0, i).copy_(
          s < 0 ? state.select(0, b).select(0, k - 1 + s) : u.select(0, b).select(0, s));
    }
  }
  return {out, new_state};
}

// y (b, T, D) contiguous; z (b, T, D) with a unit last stride; weight (D).
torch::Tensor gated_rms_norm(torch::Tensor y, torch::Tensor z, torch::Tensor weight, double eps) {
  TORCH_CHECK(y.dim() == 3 && z.sizes() == y.sizes() && z.stride(2) == 1,
              "y and z must be (b, T, D), z with a unit last stride");
  y = y.contiguous();
  weight = weight.contiguous();
  auto out = torch::empty_like(y);
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "gated_rms_norm", [&] {
    norm_kernel<scalar_t>(y, z, weight, eps, out);
  });
  return out;
}
