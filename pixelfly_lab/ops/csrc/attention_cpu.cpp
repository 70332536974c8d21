// Block-sparse softmax attention, float32 on the CPU: FlashAttention-2's forward and backward
// (Dao 2023, arXiv 2307.08691, Alg. 1 and 2) over the kept (b x b) blocks of a layout, read in place
// from the (B, H, T, D) tensors by a CSR list of each block row's kept key blocks; the block
// products are oneDNN batch-reduce GEMM micro-kernels (at::native::cpublas::brgemm).
//
// A block row keeps few blocks (the fan-in f), so its f * b scores per query fit in cache whole: the
// forward's softmax is exact over the row (max, exp, sum in one sweep each) instead of Alg. 1's running
// rescale. Forward, per (batch, head): each key block transposed once into a (D x b) tile of a buffer
// (brgemm has no transposed operand; tiles of their own ran 3% faster than one strided (D x T) K^T), then
// per block row i: S = Q_i K_j^T for each kept j, the causal diagonal block masked, P = exp(scale S - m),
// lse = m + log(rowsum), O_i = (sum_j P_ij V_j) / rowsum. (S_ij as (K_j Q_i^T)^T, K_j read in place and
// each tile transposed in L1, measured 5% slower.)
// Backward, per block row i and kept block j, in (b x b) tiles that stay in L1, the scores transposed (keys
// as rows, so that P^T and dS^T, the A operands of dV and dK, come out row-major and the per-query lse and
// Delta run along the vectors): P^T_j = exp(scale K_j Q_i^T - lse), dV_j += P^T_j dO_i, dP^T_j = V_j dO_i^T,
// dS^T_j = scale P^T_j (dP^T_j - Delta), dK_j += dS^T_j Q_i, dQ_i += dS_j K_j (dS_j: dS^T_j transposed in
// L1), with Delta = rowsum(dO * O) - dL (dL the gradient reaching lse, zero when none). (Whole rows of
// tiles at a time were 2% slower; prefetching the next block's tiles gained nothing.) dK and dV add up over
// query rows: (batch, head) pairs are split between threads, a head's rows run in order.

#if defined(__AVX512F__) && !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX512   // at::vec's AVX-512 Vectorized<float> (-march=native compiled us for this CPU)
#elif defined(__AVX2__) && !defined(__AVX512F__) && !defined(CPU_CAPABILITY_AVX2)
#define CPU_CAPABILITY_AVX2
#endif

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "transpose16.h"

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// C (M x N, ld_c) = A (M x K, ld_a) @ B (K x N, ld_b), plus C when add.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t ld_a, const float* B, int64_t ld_b,
                 float* C, int64_t ld_c, bool add) {
  at::native::cpublas::brgemm(M, N, K, ld_a, ld_b, ld_c, add, A, B, C, false);
}

// dst (cols x rows, ld_dst) = src (rows x cols, ld_src) transposed, in 16 x 16 tiles (transpose16.h, the
// routine blocksparse_cpu.cpp uses too).
inline void transpose(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
  pixelfly::transpose(src, ld_src, rows, cols, dst, ld_dst);
}

// exp with at::vec's 20-ulp polynomial (the one torch's CPU flash attention uses; ~1.5x Sleef's 1-ulp exp
// here), NaN kept NaN (the polynomial's range clamp would turn it into a number).
inline Vec fast_exp(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return Vec::blendv(x.exp_u20(), x, x.isnan());
#else
  return x.exp();
#endif
}

inline float row_max(const float* x, int64_t n) {
  float m = NEG_INF;
  int64_t c = 0;
  if (n >= W) {
    Vec vm(NEG_INF);
    for (; c + W <= n; c += W) vm = at::vec::maximum(vm, Vec::loadu(x + c));
    m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; c < n; ++c) m = std::max(m, x[c]);
  return m;
}

// x <- exp(scale * x - shift) in place; returns the sum.
inline float exp_sum(float* x, int64_t n, float scale, float shift) {
  const Vec vs(scale), vb(-shift);
  Vec acc(0.f);
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    Vec e = fast_exp(at::vec::fmadd(Vec::loadu(x + c), vs, vb));
    e.store(x + c);
    acc = acc + e;
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; c < n; ++c) {
    x[c] = std::exp(x[c] * scale - shift);
    sum += x[c];
  }
  return sum;
}

struct Layout {
  const int64_t* row_ptr;   // (R + 1,) offsets into cols
  const int64_t* cols;      // kept key blocks of each block row, ascending
  int64_t R, b, max_fan_in;
  bool causal;
};

Layout layout_of(const at::Tensor& row_ptr, const at::Tensor& cols, int64_t T, int64_t b, bool causal,
                 double scale) {
  // the forward takes the row max of the unscaled scores: the scaled scores' only for scale > 0
  TORCH_CHECK_VALUE(scale > 0 && std::isfinite(scale), "scale must be a positive finite number, got ", scale);
  TORCH_CHECK_TYPE(row_ptr.dtype() == at::kLong && cols.dtype() == at::kLong, "row_ptr and cols must be int64");
  TORCH_CHECK_VALUE(row_ptr.is_contiguous() && cols.is_contiguous() && row_ptr.device().is_cpu() &&
                    cols.device().is_cpu(), "row_ptr and cols must be contiguous CPU tensors");
  TORCH_CHECK_VALUE(b > 0 && T % b == 0, "T must be a multiple of the block size");
  const int64_t R = T / b;
  TORCH_CHECK_VALUE(row_ptr.numel() == R + 1, "row_ptr must have T / b + 1 entries");
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  int64_t max_f = 0;
  TORCH_CHECK_VALUE(rp[0] == 0 && rp[R] == cols.numel(), "row_ptr must run from 0 to cols.numel()");
  const int64_t* cs = cols.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) {
    TORCH_CHECK_VALUE(rp[i + 1] > rp[i], "block row ", i, " keeps no block");
    max_f = std::max(max_f, rp[i + 1] - rp[i]);
    // causal: a tril'ed row, so that its diagonal block, when kept, is its last
    for (int64_t n = rp[i]; n < rp[i + 1]; ++n) {
      TORCH_CHECK_VALUE(cs[n] >= 0 && cs[n] < R && (n == rp[i] || cs[n] > cs[n - 1]) && (!causal || cs[n] <= i),
                        "cols of block row ", i, " must be ascending in [0, ", causal ? i + 1 : R, ")");
    }
  }
  return Layout{rp, cs, R, b, max_f, causal};
}

void check_rank(const at::Tensor& q, const at::Tensor& v) {
  TORCH_CHECK_VALUE(q.dim() == 4 && v.dim() == 4, "q and v must be (B, H, T, D) tensors");
}

void check_input(const at::Tensor& x, const char* name, int64_t B, int64_t H, int64_t T) {
  TORCH_CHECK_TYPE(x.dtype() == at::kFloat, name, " must be float32, got ", x.dtype());
  TORCH_CHECK_VALUE(x.device().is_cpu() && x.is_contiguous() && x.dim() == 4,
                    name, " must be a contiguous CPU tensor (B, H, T, D), got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) == B && x.size(1) == H && x.size(2) == T, name, " must share (B, H, T) with q");
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& row_ptr, const at::Tensor& cols, int64_t block, bool causal,
                                double scale_) {
  check_rank(q, v);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Dv = v.size(3);
  check_input(q, "q", B, H, T);
  check_input(k, "k", B, H, T);
  check_input(v, "v", B, H, T);
  TORCH_CHECK_VALUE(k.size(3) == D, "k must have the head width of q");
  const Layout L = layout_of(row_ptr, cols, T, block, causal, scale_);
  const int64_t b = block;
  const float scale = static_cast<float>(scale_);
  auto out = at::empty({B, H, T, Dv}, q.options());
  auto lse = at::empty({B, H, T}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = out.data_ptr<float>(), *lp = lse.data_ptr<float>();

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(D * T), s(b * L.max_fan_in * b), inv(b);   // kt: (R, D, b), block j's K_j^T at j * D * b
    for (int64_t g = begin; g < end; ++g) {
      const float *Q = qp + g * T * D, *K = kp + g * T * D, *V = vp + g * T * Dv;
      float *O = op + g * T * Dv, *lse_g = lp + g * T;
      for (int64_t j = 0; j < L.R; ++j) transpose(K + j * b * D, D, kt.data() + j * D * b, b, b, D);
      for (int64_t i = 0; i < L.R; ++i) {
        const int64_t* cs = L.cols + L.row_ptr[i];
        const int64_t f = L.row_ptr[i + 1] - L.row_ptr[i], n = f * b;
        const float* Qi = Q + i * b * D;
        for (int64_t t = 0; t < f; ++t) gemm(b, b, D, Qi, D, kt.data() + cs[t] * D * b, b, s.data() + t * b, n, false);
        if (L.causal && cs[f - 1] == i) {            // the diagonal block is the row's last (ascending, tril'ed)
          for (int64_t r = 0; r < b; ++r) {
            std::fill(s.data() + r * n + (f - 1) * b + r + 1, s.data() + r * n + n, NEG_INF);
          }
        }
        for (int64_t r = 0; r < b; ++r) {
          float* row = s.data() + r * n;
          const float m = row_max(row, n) * scale;   // scale > 0: the max of the scaled scores
          const float sum = exp_sum(row, n, scale, m);
          lse_g[i * b + r] = m + std::log(sum);
          inv[r] = 1.f / sum;
        }
        float* Oi = O + i * b * Dv;
        for (int64_t t = 0; t < f; ++t) gemm(b, Dv, b, s.data() + t * b, n, V + cs[t] * b * Dv, Dv, Oi, Dv, t > 0);
        for (int64_t r = 0; r < b; ++r) {
          at::vec::map([&](Vec x) { return x * Vec(inv[r]); }, Oi + r * Dv, Oi + r * Dv, Dv);
        }
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor& grad_lse, const at::Tensor& row_ptr, const at::Tensor& cols,
                                 int64_t block, bool causal, double scale_) {
  check_rank(q, v);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Dv = v.size(3);
  check_input(q, "q", B, H, T);
  check_input(k, "k", B, H, T);
  check_input(v, "v", B, H, T);
  check_input(out, "out", B, H, T);
  check_input(grad_out, "grad_out", B, H, T);
  TORCH_CHECK_VALUE(k.size(3) == D && out.size(3) == Dv && grad_out.size(3) == Dv, "head widths must match");
  TORCH_CHECK_VALUE(lse.dtype() == at::kFloat && lse.is_contiguous() && lse.numel() == B * H * T,
                    "lse must be a contiguous float32 (B, H, T)");
  const bool has_dl = grad_lse.numel() > 0;
  TORCH_CHECK_VALUE(!has_dl || (grad_lse.dtype() == at::kFloat && grad_lse.is_contiguous() &&
                                grad_lse.numel() == B * H * T),
                    "grad_lse must be empty or a contiguous float32 (B, H, T)");
  const Layout L = layout_of(row_ptr, cols, T, block, causal, scale_);
  const int64_t b = block;
  const float scale = static_cast<float>(scale_);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *op = out.data_ptr<float>(), *dop = grad_out.data_ptr<float>(), *lp = lse.data_ptr<float>();
  const float* dlp = has_dl ? grad_lse.data_ptr<float>() : nullptr;
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(D * b), dot(Dv * b), pt(b * b), dpt(b * b), ds(b * b), delta(b);
    std::vector<char> written(L.R);   // a key block's dK and dV hold a sum (else the first product overwrites them)
    for (int64_t g = begin; g < end; ++g) {
      const float *Q = qp + g * T * D, *K = kp + g * T * D, *V = vp + g * T * Dv;
      const float *O = op + g * T * Dv, *dO = dop + g * T * Dv, *lse_g = lp + g * T;
      float *dQ = dqp + g * T * D, *dK = dkp + g * T * D, *dV = dvp + g * T * Dv;
      std::fill(written.begin(), written.end(), 0);
      for (int64_t i = 0; i < L.R; ++i) {
        const int64_t* cs = L.cols + L.row_ptr[i];
        const int64_t f = L.row_ptr[i + 1] - L.row_ptr[i];
        const float *Qi = Q + i * b * D, *dOi = dO + i * b * Dv, *Oi = O + i * b * Dv, *Li = lse_g + i * b;
        transpose(Qi, D, qt.data(), b, b, D);
        transpose(dOi, Dv, dot.data(), b, b, Dv);
        for (int64_t r = 0; r < b; ++r) {
          delta[r] = at::vec::map2_reduce_all<float>([](Vec x, Vec y) { return x * y; },
                                                     [](Vec x, Vec y) { return x + y; }, dOi + r * Dv, Oi + r * Dv, Dv)
                     - (has_dl ? dlp[g * T + i * b + r] : 0.f);
        }
        // one kept key block j at a time, its (b x b) tiles in L1: P^T_j (row x: key x of block j, column r:
        // query r of block row i), dP^T_j then dS^T_j in place, dS_j
        for (int64_t t = 0; t < f; ++t) {
          const int64_t j = cs[t];
          const float *Kj = K + j * b * D, *Vj = V + j * b * Dv;
          gemm(b, b, D, Kj, D, qt.data(), b, pt.data(), b, false);
          for (int64_t x = 0; x < b; ++x) {
            at::vec::map2([&](Vec sc, Vec l) { return fast_exp(at::vec::fmadd(sc, Vec(scale), Vec(0.f) - l)); },
                          pt.data() + x * b, pt.data() + x * b, Li, b);
          }
          if (L.causal && j == i) {                    // key offset x > query offset r on the diagonal block
            for (int64_t x = 1; x < b; ++x) std::fill(pt.data() + x * b, pt.data() + x * b + x, 0.f);
          }
          gemm(b, Dv, b, pt.data(), b, dOi, Dv, dV + j * b * Dv, Dv, written[j]);
          gemm(b, b, Dv, Vj, Dv, dot.data(), b, dpt.data(), b, false);
          for (int64_t x = 0; x < b; ++x) {            // dS^T = scale * P^T * (dP^T - Delta), in place of dP^T
            at::vec::map3([&](Vec p, Vec dp, Vec d) { return Vec(scale) * p * (dp - d); },
                          dpt.data() + x * b, pt.data() + x * b, dpt.data() + x * b, delta.data(), b);
          }
          gemm(b, D, b, dpt.data(), b, Qi, D, dK + j * b * D, D, written[j]);
          written[j] = 1;
          transpose(dpt.data(), b, ds.data(), b, b, b);
          gemm(b, D, b, ds.data(), b, Kj, D, dQ + i * b * D, D, t > 0);
        }
      }
      for (int64_t j = 0; j < L.R; ++j) {             // key blocks no row keeps
        if (!written[j]) {
          std::memset(dK + j * b * D, 0, sizeof(float) * b * D);
          std::memset(dV + j * b * Dv, 0, sizeof(float) * b * Dv);
        }
      }
    }
    at::native::cpublas::brgemm_release(false);
  });
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Block-sparse FlashAttention-2 for float32 on the CPU (pixelfly_lab.ops.native_attention)";
  m.def("forward", &forward, "(out, lse) of block-sparse attention on a CSR of kept blocks");
  m.def("backward", &backward, "(dq, dk, dv) of block-sparse attention from out and lse");
}
