// The time loops of the classic cells in C++: recurra's "compiled" CPU backend.
//
// Same math, layouts and saved tensors as recurra/ops/recurrent_fused.py (read that first; the
// readable reference is recurra/ops/recurrent_cells.py). Per step: one matmul through ATen (BLAS),
// then one pass over the (heads, batch, hidden) elements that applies every gate and writes the
// states. Python's per-op overhead disappears and the pointwise math is one vectorised loop.
//
// Layout: a "steps" tensor is (T, N, B, X) with a unit last stride (N heads, B rows); the buffers
// made here are (T, B, N, X) in memory, returned as (T, N, B, X) views, as in recurrent_fused.
// The backward functions return the gradients of the gate pre-activations (for wx) and of the
// initial state; the caller forms the recurrent-weight gradient with one batched matmul.
//
// Row-exact inference: the forward functions take optional `panels`, the recurrent weight of
// every head packed in column panels ((N, P, dh, 32), recurra/ops/streamed_matmul.py's
// pack_panels). With them, the per-step product is panel_gemm.h's, where every output element
// is one chain of fused multiply-adds over k whatever the number of rows; the pointwise pass is
// the same code for every row. A row's states are then bitwise the same whatever the batch, so
// a one-step call (decoding) and a many-row call (verifying a draft tree) agree exactly.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "panel_gemm.h"
#include "rows_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <new>
#include <vector>

// a pragma inside AT_DISPATCH's macro argument must be spelled with _Pragma
#define VECTORIZE _Pragma("omp simd")

namespace {

using at::Tensor;

template <typename T>
struct Steps {  // (T, N, B, X) with a unit last stride
  T* p;
  int64_t st, sn, sb;
  explicit Steps(const Tensor& x)
      : p(x.data_ptr<T>()), st(x.stride(0)), sn(x.stride(1)), sb(x.stride(2)) {}
  T* row(int64_t t, int64_t n, int64_t b) const { return p + t * st + n * sn + b * sb; }
};

template <typename T>
struct Heads {  // (N, B, X) with a unit last stride
  T* p;
  int64_t sn, sb;
  explicit Heads(const Tensor& x) : p(x.data_ptr<T>()), sn(x.stride(0)), sb(x.stride(1)) {}
  T* row(int64_t n, int64_t b) const { return p + n * sn + b * sb; }
};

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

// x[g * dh + d] = the g-th value, for the four gates of an LSTM-type cell
template <typename T>
inline void put4(T* x, int64_t dh, int64_t d, T g0, T g1, T g2, T g3) {
  x[d] = g0;
  x[dh + d] = g1;
  x[2 * dh + d] = g2;
  x[3 * dh + d] = g3;
}

Tensor unit_last(const Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

// The (T, ...) buffers are large (tens of MB) and a fresh allocation of that size comes from
// mmap: writing it the first time costs a page fault per 4 KiB, as much as the whole time loop
// at training sizes. Freed buffers therefore go back to this cache (at most kMaxCached bytes)
// and the next call asking for the same size reuses one. release_cache() empties it.
class BlockCache {
 public:
  static BlockCache& get() {
    static BlockCache* cache = new BlockCache();  // never destroyed: tensors may outlive exit
    return *cache;
  }
  void* take(size_t nbytes) {
    {
      std::lock_guard<std::mutex> guard(mu_);
      auto it = free_.find(nbytes);
      if (it != free_.end()) {
        void* p = it->second;
        free_.erase(it);
        cached_ -= nbytes;
        return p;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kAlign, nbytes) != 0) throw std::bad_alloc();
    return p;
  }
  void give(void* p, size_t nbytes) {
    std::lock_guard<std::mutex> guard(mu_);
    if (cached_ + nbytes <= kMaxCached) {
      free_.emplace(nbytes, p);
      cached_ += nbytes;
    } else {
      std::free(p);
    }
  }
  int64_t release() {
    std::lock_guard<std::mutex> guard(mu_);
    const int64_t was = static_cast<int64_t>(cached_);
    for (auto& kv : free_) std::free(kv.second);
    free_.clear();
    cached_ = 0;
    return was;
  }

 private:
  static constexpr size_t kAlign = 64;
  static constexpr size_t kMaxCached = size_t(1) << 30;
  std::mutex mu_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

constexpr size_t kCachedFrom = size_t(1) << 20;  // smaller buffers come from at::empty

// An empty (T, N, B, inner) buffer stored (T, B, N, inner).
Tensor steps_like(const Tensor& wx, int64_t inner, c10::optional<at::ScalarType> dtype = {}) {
  auto opts = wx.options();
  if (dtype) opts = opts.dtype(*dtype);
  const std::vector<int64_t> sizes{wx.size(0), wx.size(2), wx.size(1), inner};
  const size_t nbytes = static_cast<size_t>(wx.size(0) * wx.size(2) * wx.size(1) * inner) *
                        c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  if (nbytes < kCachedFrom) return at::empty(sizes, opts).transpose(1, 2);
  void* p = BlockCache::get().take(nbytes);
  auto deleter = [nbytes](void* q) { BlockCache::get().give(q, nbytes); };
  return at::from_blob(p, sizes, deleter, opts).transpose(1, 2);
}

int64_t release_cache() { return BlockCache::get().release(); }

// Heads at most this size multiply in the loop below rather than through batched BLAS, whose
// per-call cost dominates for many small blocks (FlashRNN's 16x16 heads).
constexpr int64_t kInlineHeadSize = 32;

// out = [add +] a @ b head by head, all (N, ., .) with a and out contiguous: a plain mm for one
// head, batched BLAS for large heads, a vectorised loop for small ones; with `panels` (b packed,
// (N, P, K, 32); no `add`), the row-exact panel product (see the top of this file).
struct HeadMatmul {
  bool single, inline_heads;
  Tensor out, a, b, out0, a0, b0;
  c10::optional<Tensor> panels;
  HeadMatmul(Tensor out_, Tensor a_, Tensor b_, c10::optional<Tensor> panels_ = {})
      : single(a_.size(0) == 1),
        inline_heads(!panels_ && !single && std::min(a_.size(2), b_.size(2)) <= kInlineHeadSize),
        out(out_), a(a_), b(inline_heads ? b_.contiguous() : b_), panels(panels_) {
    if (single) {
      out0 = out.select(0, 0);
      a0 = a.select(0, 0);
      b0 = b.select(0, 0);
    }
  }
  void run(const Tensor* add = nullptr) {
    if (panels) {
      TORCH_CHECK(add == nullptr, "the panel product takes no addend");
      AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "panel_heads", [&] {
        const int64_t N = a.size(0), B = a.size(1), K = a.size(2), W = out.size(2);
        const int64_t per_head = panels->size(1) * K * recurra::panel::kPanel;
        for (int64_t n = 0; n < N; ++n)
          recurra::panel::gemm<scalar_t>(out.data_ptr<scalar_t>() + n * B * W, W,
                                         a.data_ptr<scalar_t>() + n * B * K, K,
                                         panels->data_ptr<scalar_t>() + n * per_head, B, K, W);
      });
    } else if (inline_heads) {
      AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "head_matmul", [&] { small<scalar_t>(add); });
    } else if (single) {
      if (add) at::addmm_out(out0, add->select(0, 0), a0, b0);
      else at::mm_out(out0, a0, b0);
    } else {
      if (add) at::baddbmm_out(out, *add, a, b);
      else at::bmm_out(out, a, b);
    }
  }
  template <typename T>
  void small(const Tensor* add) {
    const int64_t N = a.size(0), B = a.size(1), M = a.size(2), K = b.size(2);
    const T* ap = a.data_ptr<T>();
    const T* bp = b.data_ptr<T>();
    const T* cp = add ? add->data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t r = 0; r < B; ++r) {
        T* o = op + (n * B + r) * K;
        const T* ar = ap + (n * B + r) * M;
        const T* c = cp ? cp + (n * B + r) * K : nullptr;
        VECTORIZE
        for (int64_t k = 0; k < K; ++k) o[k] = c ? c[k] : T(0);
        for (int64_t m = 0; m < M; ++m) {
          const T av = ar[m];
          const T* br = bp + (n * M + m) * K;
          VECTORIZE
          for (int64_t k = 0; k < K; ++k) o[k] += av * br[k];
        }
      }
  }
};

// the recurrent weight r (N, K, W) packed as (N, ceil(W / 32), K, 32) panels, or nothing
void check_panels(const c10::optional<Tensor>& panels, const Tensor& r) {
  if (!panels) return;
  const int64_t kp = recurra::panel::kPanel;
  TORCH_CHECK(panels->dim() == 4 && panels->size(0) == r.size(0) &&
                  panels->size(1) == (r.size(2) + kp - 1) / kp && panels->size(2) == r.size(1) &&
                  panels->size(3) == kp && panels->is_contiguous() &&
                  panels->scalar_type() == r.scalar_type(),
              "panels must be r (N, K, W) packed as a contiguous (N, ceil(W / ", kp, "), K, ", kp,
              ") tensor of r's dtype");
}

void check_steps(const Tensor& wx, const Tensor& r, int64_t gates) {
  TORCH_CHECK(wx.dim() == 4 && r.dim() == 3, "wx must be (T, N, B, G*dh) and r (N, dh, G*dh)");
  TORCH_CHECK(wx.size(3) == gates * r.size(1) && r.size(2) == gates * r.size(1) &&
                  wx.size(1) == r.size(0),
              "wx and r do not match");
  TORCH_CHECK(wx.device().is_cpu(), "the compiled backend runs on the CPU only");
}

// ------------------------------------------------------------------------------------- Elman
// The Elman loops split the batch: each (head, slice of rows) is a task that runs the whole time
// loop on its own rows (the rows of a batch never interact), its per-step product a small
// register-blocked matmul (rows_gemm.h) against the recurrent weight, which stays in that core's
// cache. No thread waits for another between steps, as a threaded BLAS call per step would.

// out (R x W, leading dim ldo) = a (R x K, lda) @ m (K x W, ldm)
template <typename T>
void rows_product(T* out, int64_t ldo, const T* a, int64_t lda, const T* m, int64_t ldm,
                  int64_t R, int64_t K, int64_t W) {
  const int64_t r8 = (R / 8) * 8;
  if (r8) recurra::rows_gemm<T, 8, 2>(out, ldo, a, lda, m, ldm, r8, K, W, false, false);
  if (R > r8)
    recurra::rows_gemm<T, 4, 4>(out + r8 * ldo, ldo, a + r8 * lda, lda, m, ldm, R - r8, K, W,
                                false, false);
}

// out (R x W, leading dim ldo) = a (R x K, lda) @ the panels (P, K, 32) of a (K x W) matrix,
// one panel after another on this thread (row-exact: panel_gemm.h)
template <typename T>
void panel_product(T* out, int64_t ldo, const T* a, int64_t lda, const T* panels, int64_t R,
                   int64_t K, int64_t W) {
  const int64_t kp = recurra::panel::kPanel;
  for (int64_t p = 0; p * kp < W; ++p)
    recurra::panel::panel_all_rows<T>(out + p * kp, ldo, a, lda, panels + p * K * kp, R, K,
                                      std::min<int64_t>(kp, W - p * kp));
}

struct RowSlices {
  int64_t per, count;  // `count` slices of `per` rows (the last may be shorter)
};

// enough (head, slice) tasks for torch's threads, slices of whole 8-row blocks where possible
RowSlices split_rows(int64_t N, int64_t B) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = std::max<int64_t>(1, std::min<int64_t>(B, (threads + N - 1) / N));
  int64_t per = (B + want - 1) / want;
  if (per > 8 && per % 8) per = std::min<int64_t>(B, (per + 7) / 8 * 8);
  return {per, (B + per - 1) / per};
}

// fn(n, b0, rows) for every (head n, rows b0 .. b0+rows-1) task, the tasks on torch's threads
template <typename F>
void for_row_slices(int64_t N, int64_t B, const F& fn) {
  const RowSlices sl = split_rows(N, B);
  at::parallel_for(0, N * sl.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / sl.count, b0 = (task % sl.count) * sl.per;
      fn(n, b0, std::min(sl.per, B - b0));
    }
  });
}

std::vector<Tensor> elman_forward(Tensor wx, Tensor r, Tensor h0, bool relu,
                                  c10::optional<Tensor> panels) {
  check_steps(wx, r, 1);
  check_panels(panels, r);
  wx = unit_last(wx);
  r = r.contiguous();
  h0 = h0.contiguous();
  const int64_t T = wx.size(0), N = wx.size(1), B = wx.size(2), dh = wx.size(3);
  Tensor hs = steps_like(wx, dh);
  AT_DISPATCH_FLOATING_TYPES(wx.scalar_type(), "elman_forward", [&] {
    Steps<scalar_t> X(wx), H(hs);
    const scalar_t* rp = r.data_ptr<scalar_t>();
    const scalar_t* h0p = h0.data_ptr<scalar_t>();
    for_row_slices(N, B, [&](int64_t n, int64_t b0, int64_t rows) {
      std::vector<scalar_t> g(rows * dh);
      const scalar_t* rn = rp + n * dh * dh;
      const scalar_t* pn = panels ? panels->data_ptr<scalar_t>() + n * panels->stride(0) : nullptr;
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* prev = t == 0 ? h0p + (n * B + b0) * dh : H.row(t - 1, n, b0);
        const int64_t ld = t == 0 ? dh : H.sb;
        if (pn) panel_product(g.data(), dh, prev, ld, pn, rows, dh, dh);
        else rows_product(g.data(), dh, prev, ld, rn, dh, rows, dh, dh);
        for (int64_t i = 0; i < rows; ++i) {
          const scalar_t* x = X.row(t, n, b0 + i);
          const scalar_t* gg = g.data() + i * dh;
          scalar_t* h = H.row(t, n, b0 + i);
          if (relu) {
VECTORIZE
            for (int64_t d = 0; d < dh; ++d) {
              const scalar_t v = x[d] + gg[d];
              h[d] = v > 0 ? v : scalar_t(0);
            }
          } else {
VECTORIZE
            for (int64_t d = 0; d < dh; ++d) h[d] = std::tanh(x[d] + gg[d]);
          }
        }
      }
    });
  });
  return {hs};
}

// returns (D = d pre-activations (T, N, B, dh), d h0)
std::vector<Tensor> elman_backward(Tensor dhs, Tensor r, Tensor hs, bool relu) {
  dhs = unit_last(dhs);
  const int64_t T = hs.size(0), N = hs.size(1), B = hs.size(2), dh = hs.size(3);
  Tensor D = steps_like(hs, dh);
  Tensor dh0 = at::empty({N, B, dh}, hs.options());
  Tensor rT = r.transpose(1, 2).contiguous();
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "elman_backward", [&] {
    Steps<scalar_t> H(hs), DH(dhs), Dv(D);
    const scalar_t* rtp = rT.data_ptr<scalar_t>();
    scalar_t* d0 = dh0.data_ptr<scalar_t>();
    for_row_slices(N, B, [&](int64_t n, int64_t b0, int64_t rows) {
      std::vector<scalar_t> dn(rows * dh, scalar_t(0));
      const scalar_t* rtn = rtp + n * dh * dh;
      for (int64_t t = T - 1; t >= 0; --t) {
        for (int64_t i = 0; i < rows; ++i) {
          const scalar_t* h = H.row(t, n, b0 + i);
          const scalar_t* gin = DH.row(t, n, b0 + i);
          const scalar_t* dni = dn.data() + i * dh;
          scalar_t* out = Dv.row(t, n, b0 + i);
VECTORIZE
          for (int64_t d = 0; d < dh; ++d) {
            const scalar_t k =
                relu ? (h[d] > 0 ? scalar_t(1) : scalar_t(0)) : scalar_t(1) - h[d] * h[d];
            out[d] = (gin[d] + dni[d]) * k;
          }
        }
        rows_product(dn.data(), dh, Dv.row(t, n, b0), Dv.sb, rtn, dh, rows, dh, dh);
      }
      std::copy(dn.begin(), dn.begin() + rows * dh, d0 + (n * B + b0) * dh);
    });
  });
  return {D, dh0};
}

// --------------------------------------------------------------------------------------- GRU
// returns (hs, rz, ns, hrn): rz the activated reset and update gates, ns the candidate,
// hrn = R_n h + b_hn (the reset gate's argument)
std::vector<Tensor> gru_forward(Tensor wx, Tensor r, Tensor bias_hn, Tensor h0,
                                c10::optional<Tensor> panels) {
  check_steps(wx, r, 3);
  check_panels(panels, r);
  wx = unit_last(wx);
  r = r.contiguous();
  bias_hn = bias_hn.contiguous();
  const int64_t T = wx.size(0), N = wx.size(1), B = wx.size(2), dh = wx.size(3) / 3;
  const int64_t G = 3 * dh;
  Tensor hs = steps_like(wx, dh), rz = steps_like(wx, 2 * dh), ns = steps_like(wx, dh),
         hrn = steps_like(wx, dh);
  Tensor hcur = h0.contiguous().clone();
  Tensor g = at::empty({N, B, G}, wx.options());
  HeadMatmul mm(g, hcur, r, panels);
  AT_DISPATCH_FLOATING_TYPES(wx.scalar_type(), "gru_forward", [&] {
    Steps<scalar_t> X(wx), H(hs), RZ(rz), NS(ns), HRN(hrn);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t* bp = bias_hn.data_ptr<scalar_t>();
    scalar_t* hc = hcur.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      mm.run();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* x = X.row(t, n, b);
          const scalar_t* gg = gp + (n * B + b) * G;
          const scalar_t* bias = bp + n * dh;
          scalar_t* c = hc + (n * B + b) * dh;
          scalar_t* h = H.row(t, n, b);
          scalar_t* rzr = RZ.row(t, n, b);
          scalar_t* nr = NS.row(t, n, b);
          scalar_t* hnr = HRN.row(t, n, b);
VECTORIZE
          for (int64_t d = 0; d < dh; ++d) {
            scalar_t rg = sigmoid(x[d] + gg[d]);
            scalar_t zg = sigmoid(x[dh + d] + gg[dh + d]);
            scalar_t hn = gg[2 * dh + d] + bias[d];
            scalar_t nn = std::tanh(x[2 * dh + d] + rg * hn);
            scalar_t hv = nn + zg * (c[d] - nn);
            rzr[d] = rg;
            rzr[dh + d] = zg;
            hnr[d] = hn;
            nr[d] = nn;
            h[d] = hv;
            c[d] = hv;
          }
        }
    }
  });
  return {hs, rz, ns, hrn};
}

// returns (dwx = d(wx) (T, N, B, 3dh), dhn = d(R_n h + b_hn) (T, N, B, dh), d h0); the
// gradient of R h + (0, 0, b_hn) is (dwx's r and z parts, dhn)
std::vector<Tensor> gru_backward(Tensor dhs, Tensor r, Tensor h0, Tensor hs, Tensor rz,
                                 Tensor ns, Tensor hrn) {
  dhs = unit_last(dhs);
  h0 = unit_last(h0);
  const int64_t T = hs.size(0), N = hs.size(1), B = hs.size(2), dh = hs.size(3);
  const int64_t G = 3 * dh;
  Tensor dwx = steps_like(hs, G), dhnr = steps_like(hs, dh);
  Tensor dcur = at::empty({N, B, G}, hs.options());
  Tensor dhz = at::empty({N, B, dh}, hs.options());
  Tensor dhn = at::zeros({N, B, dh}, hs.options());
  HeadMatmul mm(dhn, dcur, r.transpose(1, 2));
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "gru_backward", [&] {
    Steps<scalar_t> H(hs), DH(dhs), RZ(rz), NS(ns), HRN(hrn), DWX(dwx), DHNR(dhnr);
    Heads<scalar_t> H0(h0);
    scalar_t* dc = dcur.data_ptr<scalar_t>();
    scalar_t* dz_ = dhz.data_ptr<scalar_t>();
    const scalar_t* dn = dhn.data_ptr<scalar_t>();
    for (int64_t t = T - 1; t >= 0; --t) {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < B; ++b) {
          const int64_t o = (n * B + b);
          const scalar_t* gin = DH.row(t, n, b);
          const scalar_t* hp = t > 0 ? H.row(t - 1, n, b) : H0.row(n, b);
          const scalar_t* rzr = RZ.row(t, n, b);
          const scalar_t* nr = NS.row(t, n, b);
          const scalar_t* hnr = HRN.row(t, n, b);
          scalar_t* wxr = DWX.row(t, n, b);
          scalar_t* hnd = DHNR.row(t, n, b);
          scalar_t* cur = dc + o * G;
          scalar_t* zz = dz_ + o * dh;
          const scalar_t* dnn = dn + o * dh;
          VECTORIZE
          for (int64_t d = 0; d < dh; ++d) {
            scalar_t dht = gin[d] + dnn[d];
            scalar_t rg = rzr[d], zg = rzr[dh + d], nn = nr[d];
            scalar_t dnpre = (scalar_t(1) - zg) * (scalar_t(1) - nn * nn) * dht;
            scalar_t dr = dnpre * hnr[d] * rg * (scalar_t(1) - rg);
            scalar_t dz = (hp[d] - nn) * zg * (scalar_t(1) - zg) * dht;
            scalar_t dhnv = dnpre * rg;
            cur[d] = dr;
            cur[dh + d] = dz;
            cur[2 * dh + d] = dhnv;
            wxr[d] = dr;
            wxr[dh + d] = dz;
            wxr[2 * dh + d] = dnpre;
            hnd[d] = dhnv;
            zz[d] = dht * zg;
          }
        }
      mm.run(&dhz);
    }
  });
  return {dwx, dhnr, dhn};
}

// -------------------------------------------------------------------------------------- LSTM
// returns (hs, cs, acts): acts the activated gates (i, f, g, o), (T, N, B, 4dh)
std::vector<Tensor> lstm_forward(Tensor wx, Tensor r, Tensor h0, Tensor c0,
                                 c10::optional<Tensor> panels) {
  check_steps(wx, r, 4);
  check_panels(panels, r);
  wx = unit_last(wx);
  r = r.contiguous();
  c0 = unit_last(c0);
  const int64_t T = wx.size(0), N = wx.size(1), B = wx.size(2), dh = wx.size(3) / 4;
  const int64_t G = 4 * dh;
  Tensor hs = steps_like(wx, dh), cs = steps_like(wx, dh), acts = steps_like(wx, G);
  Tensor hcur = h0.contiguous().clone();
  Tensor g = at::empty({N, B, G}, wx.options());
  HeadMatmul mm(g, hcur, r, panels);
  AT_DISPATCH_FLOATING_TYPES(wx.scalar_type(), "lstm_forward", [&] {
    Steps<scalar_t> X(wx), H(hs), C(cs), A(acts);
    Heads<scalar_t> C0(c0);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* hc = hcur.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      mm.run();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* x = X.row(t, n, b);
          const scalar_t* gg = gp + (n * B + b) * G;
          const scalar_t* cp = t > 0 ? C.row(t - 1, n, b) : C0.row(n, b);
          scalar_t* hcr = hc + (n * B + b) * dh;
          scalar_t* h = H.row(t, n, b);
          scalar_t* c = C.row(t, n, b);
          scalar_t* a = A.row(t, n, b);
VECTORIZE
          for (int64_t d = 0; d < dh; ++d) {
            scalar_t ig = sigmoid(x[d] + gg[d]);
            scalar_t fg = sigmoid(x[dh + d] + gg[dh + d]);
            scalar_t gv = std::tanh(x[2 * dh + d] + gg[2 * dh + d]);
            scalar_t og = sigmoid(x[3 * dh + d] + gg[3 * dh + d]);
            scalar_t cv = fg * cp[d] + ig * gv;
            scalar_t hv = og * std::tanh(cv);
            put4(a, dh, d, ig, fg, gv, og);
            c[d] = cv;
            h[d] = hv;
            hcr[d] = hv;
          }
        }
    }
  });
  return {hs, cs, acts};
}

// returns (D = d pre-activations (T, N, B, 4dh), d h0, d c0)
std::vector<Tensor> lstm_backward(Tensor dhs, Tensor dcs, Tensor r, Tensor c0, Tensor acts,
                                  Tensor cs) {
  dhs = unit_last(dhs);
  dcs = unit_last(dcs);
  c0 = unit_last(c0);
  const int64_t T = cs.size(0), N = cs.size(1), B = cs.size(2), dh = cs.size(3);
  const int64_t G = 4 * dh;
  Tensor D = steps_like(cs, G);
  Tensor dcur = at::empty({N, B, G}, cs.options());
  Tensor dhn = at::zeros({N, B, dh}, cs.options());
  Tensor dcn = at::zeros({N, B, dh}, cs.options());
  Tensor rT = r.transpose(1, 2);
  HeadMatmul mm(dhn, dcur, rT);
  AT_DISPATCH_FLOATING_TYPES(cs.scalar_type(), "lstm_backward", [&] {
    Steps<scalar_t> DH(dhs), DC(dcs), C(cs), A(acts), Dv(D);
    Heads<scalar_t> C0(c0);
    scalar_t* dc = dcur.data_ptr<scalar_t>();
    const scalar_t* dhp = dhn.data_ptr<scalar_t>();
    scalar_t* dcp = dcn.data_ptr<scalar_t>();
    for (int64_t t = T - 1; t >= 0; --t) {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < B; ++b) {
          const int64_t o = n * B + b;
          const scalar_t* gh = DH.row(t, n, b);
          const scalar_t* gc = DC.row(t, n, b);
          const scalar_t* c = C.row(t, n, b);
          const scalar_t* cp = t > 0 ? C.row(t - 1, n, b) : C0.row(n, b);
          const scalar_t* a = A.row(t, n, b);
          scalar_t* out = Dv.row(t, n, b);
          scalar_t* cur = dc + o * G;
          const scalar_t* dhr = dhp + o * dh;
          scalar_t* dcr = dcp + o * dh;
VECTORIZE
          for (int64_t d = 0; d < dh; ++d) {
            scalar_t ig = a[d], fg = a[dh + d], gv = a[2 * dh + d], og = a[3 * dh + d];
            scalar_t tc = std::tanh(c[d]);
            scalar_t dht = gh[d] + dhr[d];
            scalar_t dct = gc[d] + dcr[d] + dht * og * (scalar_t(1) - tc * tc);
            scalar_t di = dct * gv * ig * (scalar_t(1) - ig);
            scalar_t df = dct * cp[d] * fg * (scalar_t(1) - fg);
            scalar_t dg = dct * ig * (scalar_t(1) - gv * gv);
            scalar_t dout = dht * tc * og * (scalar_t(1) - og);
            put4(out, dh, d, di, df, dg, dout);
            put4(cur, dh, d, di, df, dg, dout);
            dcr[d] = dct * fg;
          }
        }
      mm.run();
    }
  });
  return {D, dhn, dcn};
}

// ------------------------------------------------------------------------------------- sLSTM
// returns (hs, cs, ns, ms, acts (i, f, z, o activated; (T, N, B, 4dh)), sf = sigmoid(-f~),
// sel = [i~ > log sigmoid(f~) + m])
std::vector<Tensor> slstm_forward(Tensor wx, Tensor r, Tensor h0, Tensor c0, Tensor n0,
                                  Tensor m0, c10::optional<Tensor> panels) {
  check_steps(wx, r, 4);
  check_panels(panels, r);
  wx = unit_last(wx);
  r = r.contiguous();
  c0 = unit_last(c0);
  n0 = unit_last(n0);
  m0 = unit_last(m0);
  const int64_t T = wx.size(0), N = wx.size(1), B = wx.size(2), dh = wx.size(3) / 4;
  const int64_t G = 4 * dh;
  Tensor hs = steps_like(wx, dh), cs = steps_like(wx, dh), ns = steps_like(wx, dh),
         ms = steps_like(wx, dh), acts = steps_like(wx, G), sf = steps_like(wx, dh),
         sel = steps_like(wx, dh, at::kBool);
  Tensor hcur = h0.contiguous().clone();
  Tensor g = at::empty({N, B, G}, wx.options());
  HeadMatmul mm(g, hcur, r, panels);
  AT_DISPATCH_FLOATING_TYPES(wx.scalar_type(), "slstm_forward", [&] {
    Steps<scalar_t> X(wx), H(hs), C(cs), NS(ns), M(ms), A(acts), SF(sf);
    Steps<bool> SEL(sel);
    Heads<scalar_t> C0(c0), N0(n0), M0(m0);
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* hc = hcur.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      mm.run();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* x = X.row(t, n, b);
          const scalar_t* gg = gp + (n * B + b) * G;
          const scalar_t* cp = t > 0 ? C.row(t - 1, n, b) : C0.row(n, b);
          const scalar_t* np = t > 0 ? NS.row(t - 1, n, b) : N0.row(n, b);
          const scalar_t* mp = t > 0 ? M.row(t - 1, n, b) : M0.row(n, b);
          scalar_t* hcr = hc + (n * B + b) * dh;
          scalar_t* h = H.row(t, n, b);
          scalar_t* c = C.row(t, n, b);
          scalar_t* nr = NS.row(t, n, b);
          scalar_t* m = M.row(t, n, b);
          scalar_t* a = A.row(t, n, b);
          scalar_t* s = SF.row(t, n, b);
          bool* sl = SEL.row(t, n, b);
VECTORIZE
          for (int64_t d = 0; d < dh; ++d) {
            scalar_t gi = x[d] + gg[d];
            scalar_t gf = x[dh + d] + gg[dh + d];
            scalar_t gz = x[2 * dh + d] + gg[2 * dh + d];
            scalar_t go = x[3 * dh + d] + gg[3 * dh + d];
            // log sigmoid(f~) + m, written as recurrent_cells.log_sigmoid
            scalar_t lfm = (gf < 0 ? gf : scalar_t(0)) - std::log1p(std::exp(-std::abs(gf))) + mp[d];
            bool above = gi > lfm;
            scalar_t mv = above ? gi : lfm;
            scalar_t ig = std::exp(gi - mv);
            scalar_t fg = std::exp(lfm - mv);
            scalar_t zg = std::tanh(gz);
            scalar_t og = sigmoid(go);
            scalar_t cv = fg * cp[d] + ig * zg;
            scalar_t nv = fg * np[d] + ig;
            scalar_t hv = og * (cv / nv);
            s[d] = sigmoid(-gf);
            sl[d] = above;
            m[d] = mv;
            put4(a, dh, d, ig, fg, zg, og);
            c[d] = cv;
            nr[d] = nv;
            h[d] = hv;
            hcr[d] = hv;
          }
        }
    }
  });
  return {hs, cs, ns, ms, acts, sf, sel};
}

// returns (D = d (i~, f~, z~, o~) (T, N, B, 4dh), d h0, d c0, d n0, d m0)
std::vector<Tensor> slstm_backward(Tensor dhs, Tensor dcs, Tensor dns, Tensor dms, Tensor r,
                                   Tensor c0, Tensor n0, Tensor acts, Tensor sf, Tensor sel,
                                   Tensor hs, Tensor cs, Tensor ns) {
  dhs = unit_last(dhs);
  dcs = unit_last(dcs);
  dns = unit_last(dns);
  dms = unit_last(dms);
  c0 = unit_last(c0);
  n0 = unit_last(n0);
  const int64_t T = hs.size(0), N = hs.size(1), B = hs.size(2), dh = hs.size(3);
  const int64_t G = 4 * dh;
  Tensor D = steps_like(hs, G);
  Tensor dcur = at::empty({N, B, G}, hs.options());
  Tensor dhn = at::zeros({N, B, dh}, hs.options());
  Tensor dcn = at::zeros({N, B, dh}, hs.options());
  Tensor dnn = at::zeros({N, B, dh}, hs.options());
  Tensor dmn = at::zeros({N, B, dh}, hs.options());
  Tensor rT = r.transpose(1, 2);
  HeadMatmul mm(dhn, dcur, rT);
  AT_DISPATCH_FLOATING_TYPES(hs.scalar_type(), "slstm_backward", [&] {
    Steps<scalar_t> DH(dhs), DC(dcs), DN(dns), DM(dms), A(acts), SF(sf), H(hs), C(cs), NS(ns),
        Dv(D);
    Steps<bool> SEL(sel);
    Heads<scalar_t> C0(c0), N0(n0);
    scalar_t* dc = dcur.data_ptr<scalar_t>();
    const scalar_t* dhp = dhn.data_ptr<scalar_t>();
    scalar_t* dcp = dcn.data_ptr<scalar_t>();
    scalar_t* dnp = dnn.data_ptr<scalar_t>();
    scalar_t* dmp = dmn.data_ptr<scalar_t>();
    for (int64_t t = T - 1; t >= 0; --t) {
      for (int64_t n = 0; n < N; ++n)
        for (int64_t b = 0; b < B; ++b) {
          const int64_t o = n * B + b;
          const scalar_t* gh = DH.row(t, n, b);
          const scalar_t* gc = DC.row(t, n, b);
          const scalar_t* gn = DN.row(t, n, b);
          const scalar_t* gm = DM.row(t, n, b);
          const scalar_t* a = A.row(t, n, b);
          const scalar_t* s = SF.row(t, n, b);
          const bool* sl = SEL.row(t, n, b);
          const scalar_t* h = H.row(t, n, b);
          const scalar_t* c = C.row(t, n, b);
          const scalar_t* nv = NS.row(t, n, b);
          const scalar_t* cp = t > 0 ? C.row(t - 1, n, b) : C0.row(n, b);
          const scalar_t* np = t > 0 ? NS.row(t - 1, n, b) : N0.row(n, b);
          scalar_t* out = Dv.row(t, n, b);
          scalar_t* cur = dc + o * G;
          const scalar_t* dhr = dhp + o * dh;
          scalar_t* dcr = dcp + o * dh;
          scalar_t* dnr = dnp + o * dh;
          scalar_t* dmr = dmp + o * dh;
VECTORIZE
          for (int64_t d = 0; d < dh; ++d) {
            scalar_t ig = a[d], fg = a[dh + d], zg = a[2 * dh + d], og = a[3 * dh + d];
            scalar_t Hd = gh[d] + dhr[d];
            scalar_t Cd = gc[d] + dcr[d] + Hd * (og / nv[d]);
            scalar_t Nd = gn[d] + dnr[d] + Hd * (-h[d] / nv[d]);
            scalar_t Md = gm[d] + dmr[d];
            scalar_t dout = Hd * (c[d] / nv[d] * og * (scalar_t(1) - og));
            scalar_t dz = Cd * (ig * (scalar_t(1) - zg * zg));
            scalar_t P = (Nd + zg * Cd) * ig;
            scalar_t Q = (cp[d] * Cd + np[d] * Nd) * fg;
            // m' = max(i~, l): its gradient M - P - Q goes to the larger argument
            scalar_t di = sl[d] ? Md - Q : P;
            scalar_t dl = sl[d] ? Q : Md - P;
            scalar_t df = dl * s[d];
            put4(out, dh, d, di, df, dz, dout);
            put4(cur, dh, d, di, df, dz, dout);
            dcr[d] = Cd * fg;
            dnr[d] = Nd * fg;
            dmr[d] = dl;
          }
        }
      mm.run();
    }
  });
  return {D, dhn, dcn, dnn, dmn};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("release_cache", &release_cache);
  m.def("elman_forward", &elman_forward);
  m.def("elman_backward", &elman_backward);
  m.def("gru_forward", &gru_forward);
  m.def("gru_backward", &gru_backward);
  m.def("lstm_forward", &lstm_forward);
  m.def("lstm_backward", &lstm_backward);
  m.def("slstm_forward", &slstm_forward);
  m.def("slstm_backward", &slstm_backward);
}
