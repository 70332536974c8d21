// Row sweeps of small GEMMs for the 'torch' path of pixelfly_lab (pixelfly_lab/ops/native_linear.py).
//
// One function, sweep(): the rows of the operands are cut into panels of `panel` rows, shared among
// OpenMP threads (at::parallel_for), and panels into tiles of `tile` rows; per tile it runs the
// products, per panel the grams (below), both as oneDNN
// batch-reduce GEMM micro-kernels on raw pointers (at::native::cpublas::brgemm), so that a
// group's input columns are read in place (a view with its leading dimension), products are
// written or added in place into the output's columns, and no tile is copied except the
// transposes the second list needs:
//
//   products:  C_c[tile, c0:c0+N] (+)= A_a[tile, a0:a0+K] @ B_b[off : off + K*ldb] (K x N, ld ldb)
//              K == 0 zeroes the slice instead (columns no product writes first). An output
//              C_c may be an A operand of later products (the low-rank z = x V, then z U^T).
//   grams:     acc_i[r0:r0+M, c0:c0+N] += A_a[tile, a0:a0+M]^T @ B_b[tile, b0:b0+N]
//              summed over every tile: the blocks' gradients (dS_g = gathered side^T @ row side).
//              Each thread accumulates into its own copy; the copies are summed at the end.
//
// The Python side (native_linear.py) turns a GEMM plan (pixelfly_lab/ops/torch_plan.py) into the
// two lists once per plan and checks every operand's shape before the call; this file trusts them
// except for what TORCH_CHECK below states.
//
// Reference: block-sparse GEMM as grouped dense GEMMs (Pixelfly, Dao, Chen et al., ICLR 2022,
// arXiv 2112.00029, Sec. 4; this CPU formulation is ours); brgemm: oneDNN's micro-kernel API.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

namespace {

constexpr int kProductFields = 10;  // a_id, a_col, K, b_id, b_off, ldb, N, c_col, add, c_id
constexpr int kGramFields = 9;      // a_id, a_col, M, b_id, b_col, N, acc_id, acc_row, acc_col

// dst (cols x rows, ld rows) = src (rows x cols, ld lds)^T, in 16 x 16 tiles that stay in L1.
void transpose_tile(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst) {
  constexpr int64_t kB = 16;
  for (int64_t c0 = 0; c0 < cols; c0 += kB) {
    const int64_t c1 = std::min(cols, c0 + kB);
    for (int64_t r0 = 0; r0 < rows; r0 += kB) {
      const int64_t r1 = std::min(rows, r0 + kB);
      for (int64_t c = c0; c < c1; ++c) {
        float* d = dst + c * rows;
        for (int64_t r = r0; r < r1; ++r) d[r] = src[r * lds + c];
      }
    }
  }
}

void check_operands(const std::vector<at::Tensor>& xs, const char* what) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, what, ": CPU float32 tensors only");
    TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, what, ": 2-d tensors with unit column stride only");
  }
}

}  // namespace

// See the file's header. `accs` are written (not added to): the sum over all rows.
void sweep(int64_t rows, int64_t tile, int64_t panel,
           std::vector<at::Tensor> a_ops, std::vector<at::Tensor> b_ops, std::vector<at::Tensor> outs, at::Tensor products,
           std::vector<at::Tensor> g_a, std::vector<at::Tensor> g_b, at::Tensor grams, std::vector<at::Tensor> accs) {
  TORCH_CHECK(tile > 0 && panel > 0, "tile and panel must be positive");
  TORCH_CHECK(products.scalar_type() == at::kLong && products.is_contiguous() &&
              (products.numel() == 0 || products.size(1) == kProductFields), "products: (n, 10) contiguous int64");
  TORCH_CHECK(grams.scalar_type() == at::kLong && grams.is_contiguous() &&
              (grams.numel() == 0 || grams.size(1) == kGramFields), "grams: (n, 9) contiguous int64");
  check_operands(a_ops, "a_ops");
  check_operands(g_a, "g_a");
  check_operands(g_b, "g_b");
  check_operands(accs, "accs");
  for (const auto& b : b_ops)
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == at::kFloat && b.is_contiguous(), "b_ops: contiguous float32");
  const int64_t n_products = products.numel() ? products.size(0) : 0;
  const int64_t n_grams = grams.numel() ? grams.size(0) : 0;
  check_operands(outs, "outs");
  const int64_t* P = products.data_ptr<int64_t>();
  const int64_t* G = grams.data_ptr<int64_t>();

  // which gram A operands a tile must transpose, and how wide each is
  std::vector<char> transposed(g_a.size(), 0);
  for (int64_t i = 0; i < n_grams; ++i) transposed[G[i * kGramFields]] = 1;
  int64_t t_width = 0;
  for (size_t a = 0; a < g_a.size(); ++a)
    if (transposed[a]) t_width += g_a[a].size(1);

  const int64_t n_panels = (rows + panel - 1) / panel;
  const int threads = at::get_num_threads();
  // per thread: its accumulators (thread 0 writes into accs itself) and whether it wrote them
  std::vector<std::vector<at::Tensor>> own(threads);
  std::vector<char> touched(threads, 0);
  own[0] = accs;

  // panels are handed out one at a time (an atomic counter), not split in equal shares up front:
  // on a shared machine one thread may run at half speed, and a static split would wait for it
  std::atomic<int64_t> next_panel(0);
  const int64_t workers = std::min<int64_t>(threads, n_panels);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const int tid = at::get_thread_num();
    if (n_grams && own[tid].empty()) {
      for (const auto& acc : accs) own[tid].push_back(at::empty_like(acc));
    }
    std::vector<float> t_buffer(n_grams ? t_width * panel : 0);
    std::vector<const float*> t_base(g_a.size(), nullptr);
    for (int64_t t = next_panel++; t < n_panels; t = next_panel++) {
      const int64_t p0 = t * panel, p1 = std::min(rows, p0 + panel);
      for (int64_t r0 = p0; r0 < p1; r0 += tile) {
        const int64_t m = std::min(tile, p1 - r0);
        for (int64_t i = 0; i < n_products; ++i) {
          const int64_t* p = P + i * kProductFields;
          const at::Tensor& a = a_ops[p[0]];
          const int64_t K = p[2], N = p[6];
          const at::Tensor& out = outs[p[9]];
          float* c = out.data_ptr<float>() + r0 * out.stride(0) + p[7];
          if (K == 0) {
            for (int64_t r = 0; r < m; ++r) std::memset(c + r * out.stride(0), 0, N * sizeof(float));
            continue;
          }
          at::native::cpublas::brgemm(m, N, K, a.stride(0), p[5], out.stride(0), p[8] != 0,
                                      a.data_ptr<float>() + r0 * a.stride(0) + p[1],
                                      b_ops[p[3]].data_ptr<float>() + p[4], c, false);
        }
      }
      if (!n_grams) continue;
      // the grams over the whole panel: K = its rows (their accumulators are read and written
      // once per panel, so a panel of several tiles moves them through the caches less often)
      const int64_t m = p1 - p0;
      float* next = t_buffer.data();
      for (size_t a = 0; a < g_a.size(); ++a) {
        if (!transposed[a]) continue;
        const int64_t w = g_a[a].size(1);
        transpose_tile(g_a[a].data_ptr<float>() + p0 * g_a[a].stride(0), g_a[a].stride(0), m, w, next);
        t_base[a] = next;
        next += w * m;
      }
      const bool add = touched[tid] != 0;
      for (int64_t i = 0; i < n_grams; ++i) {
        const int64_t* q = G + i * kGramFields;
        const at::Tensor& b = g_b[q[3]];
        at::Tensor& acc = own[tid][q[6]];
        at::native::cpublas::brgemm(q[2], q[5], m, m, b.stride(0), acc.stride(0), add,
                                    t_base[q[0]] + q[1] * m, b.data_ptr<float>() + p0 * b.stride(0) + q[4],
                                    acc.data_ptr<float>() + q[7] * acc.stride(0) + q[8], false);
      }
      touched[tid] = 1;
    }
    at::native::cpublas::brgemm_release(false);
  });

  if (!n_grams) return;
  // accs = sum of the touched threads' copies (zero when no thread had a tile)
  int first = -1;
  for (int t = 0; t < threads; ++t) {
    if (!touched[t]) continue;
    if (first < 0) {
      first = t;
      if (t != 0)
        for (size_t i = 0; i < accs.size(); ++i) accs[i].copy_(own[t][i]);
    } else {
      for (size_t i = 0; i < accs.size(); ++i) accs[i].add_(own[t][i]);
    }
  }
  if (first < 0)
    for (auto& acc : accs) acc.zero_();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sweep", &sweep, "Tiled brgemm products and grams over rows (see blocksparse_cpu.cpp)");
}
