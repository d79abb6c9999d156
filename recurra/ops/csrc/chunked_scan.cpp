// Chunked forward of the scalar-decay linear recurrence shared by Mamba-2's SSD and causal
// linear attention, for inference (no autograd). Per batch row b and head h, with the state S
// (N x P) and an optional normaliser z (N):
//
//     S_t = a_t S_{t-1} + B_t^T (s_t x_t)      z_t = a_t z_{t-1} + B_t
//     y_t = C_t S_t [/ (C_t . z_t + eps)] + D_h x_t
//
// with a_t = exp(log_a_t) (a_t = 1 without log_a), s_t an optional per-step input scale, and
// B, C optionally passed through elu(.) + 1 (linear attention's feature map) as they are read.
// The math is that of recurra.ops.ssd.ssd_chunked / linear_attention_chunked (the oracles are
// the reference loops next to them); this file computes it in chunks of `chunk` steps with the
// chunk's inputs copied into small cache-resident tiles, so that every input is read once and y
// written once, with no full-size temporaries.
//
// Inside a chunk (rows i, j < q; cum_i = sum of log_a over the chunk up to i):
//     G_ij = (C_i . B_j) exp(cum_i - cum_j) for j <= i, else 0
//     Y    = diag(exp(cum)) C S_prev + G X
//     S    = exp(cum_{q-1}) S_prev + (B * exp(cum_{q-1} - cum))^T X
// The tasks (b, h) are independent and run in parallel (OpenMP); each walks its chunks in order.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "rows_gemm.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using recurra::rows_gemm;

template <typename T>
inline T feature(T v, bool elu) {
  return elu ? (v > T(0) ? v + T(1) : std::exp(v)) : v;
}

template <typename T>
void scan_kernel(const torch::Tensor& x, const torch::Tensor* log_a, const torch::Tensor* x_scale,
                 const torch::Tensor& Bt, const torch::Tensor& Ct, const torch::Tensor* Dt,
                 const torch::Tensor& h0, const torch::Tensor* z0, int64_t chunk, bool elu,
                 double eps, torch::Tensor& y, torch::Tensor& h_out, torch::Tensor* z_out) {
  const int64_t nb = x.size(0), T_len = x.size(1), H = x.size(2), P = x.size(3);
  const int64_t G = Bt.size(2), N = Bt.size(3), per_group = H / G;
  const int64_t q_max = std::min<int64_t>(chunk, std::max<int64_t>(T_len, 1));
  const T* xp = x.data_ptr<T>();
  const T* bp = Bt.data_ptr<T>();
  const T* cp = Ct.data_ptr<T>();
  const T* lap = log_a ? log_a->data_ptr<T>() : nullptr;
  const T* sp = x_scale ? x_scale->data_ptr<T>() : nullptr;
  const T* dp = Dt ? Dt->data_ptr<T>() : nullptr;
  const T* h0p = h0.data_ptr<T>();
  const T* z0p = z0 ? z0->data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  T* hp = h_out.data_ptr<T>();
  T* zp = z_out ? z_out->data_ptr<T>() : nullptr;
  const auto xs = x.strides(), bs = Bt.strides(), cs = Ct.strides(), ys = y.strides();
  const int64_t las0 = log_a ? log_a->stride(0) : 0, las1 = log_a ? log_a->stride(1) : 0,
                las2 = log_a ? log_a->stride(2) : 0;
  const int64_t ss0 = x_scale ? x_scale->stride(0) : 0, ss1 = x_scale ? x_scale->stride(1) : 0,
                ss2 = x_scale ? x_scale->stride(2) : 0;
  const int64_t ds0 = Dt ? Dt->stride(0) : 0;
  const bool normalize = z_out != nullptr;

  at::parallel_for(0, nb * H, 1, [&](int64_t begin, int64_t end) {
    // per-thread tiles (q x P inputs and outputs, q x N keys/queries, N x P state)
    std::vector<T> X(q_max * P), Xraw(dp ? q_max * P : 0), Bq(q_max * N), wq(q_max),
        Bn(N * q_max), Cq(q_max * N), Ce(q_max * N), Gm(q_max * q_max), Y(q_max * P),
        S(N * P), z(N), cum(q_max), den(q_max);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H, g = h / per_group;
      const T d = dp ? dp[h * ds0] : T(0);
      // the state (P x N outside) as N x P rows here
      for (int64_t p = 0; p < P; ++p)
        for (int64_t n = 0; n < N; ++n) S[n * P + p] = h0p[((b * H + h) * P + p) * N + n];
      if (normalize)
        for (int64_t n = 0; n < N; ++n) z[n] = z0p[(b * H + h) * N + n];
      for (int64_t t0 = 0; t0 < T_len; t0 += q_max) {
        const int64_t q = std::min<int64_t>(q_max, T_len - t0);
        // the rows of one (b, h) are strided (H * P apart): the hardware prefetcher does not
        // follow them across pages, so ask for the next chunk's rows while this one computes
        const int64_t t_next = t0 + q, q_next = std::min<int64_t>(q_max, T_len - t_next);
        for (int64_t i = 0; i < q_next; ++i) {
          const int64_t t = t_next + i;
          const char* xr = reinterpret_cast<const char*>(xp + b * xs[0] + t * xs[1] + h * xs[2]);
          const char* yr = reinterpret_cast<const char*>(yp + b * ys[0] + t * ys[1] + h * ys[2]);
          for (int64_t o = 0; o < P * static_cast<int64_t>(sizeof(T)); o += 64) {
            __builtin_prefetch(xr + o, 0, 3);
            __builtin_prefetch(yr + o, 1, 3);
          }
          const char* br = reinterpret_cast<const char*>(bp + b * bs[0] + t * bs[1] + g * bs[2]);
          const char* cr = reinterpret_cast<const char*>(cp + b * cs[0] + t * cs[1] + g * cs[2]);
          for (int64_t o = 0; o < N * static_cast<int64_t>(sizeof(T)); o += 64) {
            __builtin_prefetch(br + o, 0, 3);
            __builtin_prefetch(cr + o, 0, 3);
          }
        }
        // load the chunk: cumulative log-decay, scaled inputs, B and C rows
        T run = 0;
        for (int64_t i = 0; i < q; ++i) {
          const int64_t t = t0 + i;
          if (lap) run += lap[b * las0 + t * las1 + h * las2];
          cum[i] = run;
          const T s = sp ? sp[b * ss0 + t * ss1 + h * ss2] : T(1);
          const T* xr = xp + b * xs[0] + t * xs[1] + h * xs[2];
          for (int64_t p = 0; p < P; ++p) X[i * P + p] = s * xr[p];
          if (dp)
            for (int64_t p = 0; p < P; ++p) Xraw[i * P + p] = xr[p];
          const T* br = bp + b * bs[0] + t * bs[1] + g * bs[2];
          const T* cr = cp + b * cs[0] + t * cs[1] + g * cs[2];
          const T e = std::exp(cum[i]);
          for (int64_t n = 0; n < N; ++n) {
            Bq[i * N + n] = feature(br[n], elu);
            Cq[i * N + n] = feature(cr[n], elu);
            Ce[i * N + n] = e * Cq[i * N + n];
          }
        }
        const T last = cum[q - 1], decay = std::exp(last);
        for (int64_t i = 0; i < q; ++i) {
          wq[i] = std::exp(last - cum[i]);  // decay from step i to the chunk's end
          for (int64_t n = 0; n < N; ++n) Bn[n * q + i] = Bq[i * N + n];
        }
        // G = (C B^T) o exp(cum_i - cum_j) on the lower triangle (the difference of cumulative
        // sums, never exp(cum_i) exp(-cum_j), which can overflow), zero above it
        rows_gemm<T>(Gm.data(), q, Cq.data(), N, Bn.data(), q, q, N, q, false, false);
        for (int64_t i = 0; i < q; ++i) {
          for (int64_t j = 0; j <= i; ++j) Gm[i * q + j] *= std::exp(cum[i] - cum[j]);
          for (int64_t j = i + 1; j < q; ++j) Gm[i * q + j] = T(0);
        }
        // Y = Ce S_prev + G X
        rows_gemm<T>(Y.data(), P, Ce.data(), N, S.data(), P, q, N, P, false, false);
        rows_gemm<T>(Y.data(), P, Gm.data(), q, X.data(), P, q, q, P, true, true);
        if (normalize) {
          for (int64_t i = 0; i < q; ++i) {
            T acc = 0;
            for (int64_t n = 0; n < N; ++n) acc += Ce[i * N + n] * z[n];
            for (int64_t j = 0; j <= i; ++j) acc += Gm[i * q + j];
            den[i] = acc + static_cast<T>(eps);
          }
          for (int64_t n = 0; n < N; ++n) {
            T acc = decay * z[n];
            for (int64_t i = 0; i < q; ++i) acc += Bn[n * q + i] * wq[i];
            z[n] = acc;
          }
        }
        // S = decay S_prev + (B * w)^T X, w_i = exp(cum_{q-1} - cum_i)
        for (auto& v : S) v *= decay;
        rows_gemm<T>(S.data(), P, Bq.data(), N, X.data(), P, N, q, P, true, false, true,
                     wq.data());
        // write y
        for (int64_t i = 0; i < q; ++i) {
          T* yr = yp + b * ys[0] + (t0 + i) * ys[1] + h * ys[2];
          const T inv = normalize ? T(1) / den[i] : T(1);
          if (dp) {
            for (int64_t p = 0; p < P; ++p) yr[p] = Y[i * P + p] * inv + d * Xraw[i * P + p];
          } else {
            for (int64_t p = 0; p < P; ++p) yr[p] = Y[i * P + p] * inv;
          }
        }
      }
      for (int64_t p = 0; p < P; ++p)
        for (int64_t n = 0; n < N; ++n) hp[((b * H + h) * P + p) * N + n] = S[n * P + p];
      if (normalize)
        for (int64_t n = 0; n < N; ++n) zp[(b * H + h) * N + n] = z[n];
    }
  });
}

void check_last_dim_unit(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name,
              " must have a unit stride on its last axis");
}

}  // namespace

// x (b, T, H, P); log_a, x_scale (b, T, H) or undefined; B, C (b, T, G, N); D (H) or undefined;
// h0 (b, H, P, N) contiguous; z0 (b, H, N) contiguous or undefined (no normaliser).
// Returns y (b, T, H, P) contiguous, the final state (b, H, P, N) and, with z0, the final z.
std::vector<torch::Tensor> chunked_scan_forward(
    torch::Tensor x, c10::optional<torch::Tensor> log_a, c10::optional<torch::Tensor> x_scale,
    torch::Tensor B, torch::Tensor C, c10::optional<torch::Tensor> D, torch::Tensor h0,
    c10::optional<torch::Tensor> z0, int64_t chunk, bool elu, double eps) {
  TORCH_CHECK(x.dim() == 4 && B.dim() == 4 && C.sizes() == B.sizes(), "bad shapes");
  TORCH_CHECK(chunk >= 1, "chunk must be >= 1");
  TORCH_CHECK(x.size(2) % B.size(2) == 0, "heads must be divisible by groups");
  check_last_dim_unit(x, "x");
  check_last_dim_unit(B, "B");
  check_last_dim_unit(C, "C");
  h0 = h0.contiguous();
  auto y = torch::empty(x.sizes(), x.options());
  auto h_out = torch::empty_like(h0);
  torch::Tensor z_in, z_out;
  if (z0) {
    z_in = z0->contiguous();
    z_out = torch::empty_like(z_in);
  }
  const torch::Tensor* la = log_a ? &*log_a : nullptr;
  const torch::Tensor* sc = x_scale ? &*x_scale : nullptr;
  const torch::Tensor* dd = D ? &*D : nullptr;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "chunked_scan_forward", [&] {
    scan_kernel<scalar_t>(x, la, sc, B, C, dd, h0, z0 ? &z_in : nullptr, chunk, elu, eps, y,
                          h_out, z0 ? &z_out : nullptr);
  });
  if (z0) return {y, h_out, z_out};
  return {y, h_out};
}
