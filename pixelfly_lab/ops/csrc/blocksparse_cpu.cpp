// Row sweeps of small GEMMs for the 'torch' path of pixelfly_lab (pixelfly_lab/ops/native_linear.py).
//
// One function, sweep(): the rows of the operands are cut into panels of `panel` rows, shared among
// OpenMP threads (at::parallel_for), and panels into tiles of `tile` rows; per tile it runs the
// products, per panel the grams (below), both as oneDNN
// batch-reduce GEMM micro-kernels on raw pointers (at::native::cpublas::brgemm), so that a
// group's input columns are read in place (a view with its leading dimension), products are
// written or added in place into the output's columns (or first into a window's buffer: below),
// and no tile is copied except the transposes the second list needs:
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
// Staged (`stages`, one tile per panel): the lists cut into consecutive ranges, and per panel each
// range's products run and then its grams. The float32 backward of a plan that gathers x passes one
// stage per group (native_stages.backward_stages) where that measured faster on the machine
// (native_stages.staging_pays): a group's dX products read its columns of gy, and its grams read
// them again right after, from the caches (Xeon with AMX, 1024 -> 4096 at 4096 rows, one thread:
// backward 116.1 -> 109.9 ms released, 68.7 -> 61.4 at budget 0.1; on an AMD EPYC it was slower).
// Each operand of the grams is transposed on its first use in a panel, after the products of the
// stages before; a gram reading an output of the products (gz) must sit in or after the stage of its
// last writer (checked).
//
// Gathered A (`gathers`, bfloat16 gather tables: the forward of a plan that gathers x, dX of a transposed
// plan): per tile, right before a product with A id -1, the listed column ranges of A operands (a
// group's runs of x, then [z, 1]; or of gy, then gz) are copied side by side into a thread's scratch,
// and the products read that: one micro-kernel call per output slice (K = the runs' and the low-rank
// factor's together, B packed alike) instead of one per run and one for the low-rank term, each of
// which reads and writes the slice's float32 window again
// (AMX: each extra pass over the windows cost 1.9-2.2 ms where the whole product took 11.1; measured,
// 16 slices 256 wide into a 4096-wide output at 4096 rows, one thread: products K 256 11.1 ms,
// K 192 + 64 12.9, 128 + 64 + 64 15.1; K 64 alone 5.3).
//
// Large outputs (at least `stream_bytes`, chosen by the Python side) whose products form windows
// (find_windows: a gather plan's groups, each output slice's products consecutive) are accumulated
// per window in a small float32 buffer and written once by non-temporal stores: no line of the
// output is read from memory before it is written, and none is kept in the caches.
//
// bfloat16 (what torch.autocast gives on the CPU): the same lists, with B operands in the VNNI
// layout (pairs of rows interleaved: (K/2, N, 2), what oneDNN's AMX and AVX512-BF16 micro-kernels
// read; the Python side packs them, every K even, the low-rank ones padded to the kernels' K step:
// 32 for AMX, 2 for AVX512-BF16, native_linear.K_STEP_16BIT),
// products accumulated in float32 and rounded to bfloat16 once: per output window where the
// table has them (find_windows: a gather plan's groups, each slice's products consecutive),
// else per tile in a float32 copy of the tile's rows (the scatter plans, where several groups add
// into the same columns); an output later products read (the lead products' z = x V) right after
// the product that writes it. Grams in float32 accumulators, each gram's B slice packed to VNNI
// right before the grams that read it (a float32 B operand: the whole panel, rounded; an odd last
// row padded with zeros). float32 A and gram operands of a bfloat16 sweep
// (x under autocast) are rounded into a thread's scratch: an A operand's tile at the tile's start, a
// gram operand's panel 16 rows at a time (a strip kept in L1) as it is transposed or packed; a
// float32 output 0 (dX) gets the float32 sums unrounded.
//
// Reference: block-sparse GEMM as grouped dense GEMMs (Pixelfly, Dao, Chen et al., ICLR 2022,
// arXiv 2112.00029, Sec. 4; this CPU formulation is ours); brgemm: oneDNN's micro-kernel API.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "transpose16.h"
#if defined(__AVX512F__) || defined(__AVX512BW__) || defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int kProductFields = 10;  // a_id, a_col, K, b_id, b_off, ldb, N, c_col, add, c_id
constexpr int kGramFields = 9;      // a_id, a_col, M, b_id, b_col, N, acc_id, acc_row, acc_col
constexpr int kGatherFields = 5;    // product, a_id, a_col, width, scratch column
// 32 bits of any type (a VNNI pair of bfloat16s), read and written without breaking aliasing rules
typedef uint32_t __attribute__((may_alias)) word32;

// dst (ceil(rows/2), cols, 2) = src (rows x cols, ld lds) in the VNNI layout, dst's pairs of rows
// ldd columns apart (default: cols); an odd last row is paired with zeros. With AVX512-BW, 16
// columns of a row pair per permute.
void pack_vnni(const at::BFloat16* src, int64_t lds, int64_t rows, int64_t cols, at::BFloat16* dst, int64_t ldd = -1) {
  if (ldd < 0) ldd = cols;
#ifdef __AVX512BW__
  alignas(64) int16_t order[32];
  for (int j = 0; j < 16; ++j) { order[2 * j] = j; order[2 * j + 1] = 16 + j; }
  const __m512i interleave = _mm512_load_si512(order);
#endif
  for (int64_t r = 0; r < rows; r += 2) {
    const at::BFloat16* s0 = src + r * lds;
    const at::BFloat16* s1 = r + 1 < rows ? s0 + lds : nullptr;
    at::BFloat16* d = dst + (r / 2) * ldd * 2;
    int64_t c = 0;
#ifdef __AVX512BW__
    if (s1) {
      for (; c + 16 <= cols; c += 16) {
        const __m512i pair = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s0 + c))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s1 + c)), 1);
        _mm512_storeu_si512(d + 2 * c, _mm512_permutexvar_epi16(interleave, pair));
      }
    }
#endif
    for (; c < cols; ++c) {
      d[2 * c] = s0[c];
      d[2 * c + 1] = s1 ? s1[c] : at::BFloat16(0);
    }
  }
}

// A buffer of n elements, uninitialised (std::vector<T>(n) zeroes them).
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> memory;
  explicit Scratch(int64_t n) : memory(n > 0 ? new T[n] : nullptr) {}
  T* data() const { return memory.get(); }
};

// CPU, 2-d, unit column stride, of the sweep's dtype; with `wide`, float32 also (a bfloat16 sweep
// rounds those operands per tile or per strip of a panel, or stores such an output unrounded).
void check_operands(const std::vector<at::Tensor>& xs, at::ScalarType dtype, const char* what, bool wide = false) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == dtype || (wide && x.scalar_type() == at::kFloat)), what,
                wide ? ": CPU tensors of the sweep's dtype or float32 only" : ": CPU tensors of the sweep's dtype only");
    TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, what, ": 2-d tensors with unit column stride only");
  }
}

// C (+)= A @ B in the element type's micro-kernel; B in VNNI for bfloat16 (the offset of row k0,
// column n0 of a (K, ldb) matrix is then k0 * ldb + 2 * n0).
inline void product(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                     const float* a, const float* b, int64_t b_off, float* c) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b + b_off, c, false);
}
inline void product(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                    const at::BFloat16* a, const at::BFloat16* b, int64_t b_off, float* c) {
  const int64_t k0 = b_off / ldb, n0 = b_off % ldb;
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b + k0 * ldb + 2 * n0, c, true);
}


#ifdef __AVX512F__
constexpr bool kStreams = true;    // store_rows has streaming stores: large outputs go through windows
#else
constexpr bool kStreams = false;   // windows would only add a copy for float32
#endif

// Bytes from p to the next multiple of `align` (0 where p is on one).
inline int64_t to_boundary(const void* p, int64_t align) {
  return (align - static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % align)) % align;
}

// dst (rows x cols, ld ldd) = src (float32, ld lds) in dst's type: float32 copied, bfloat16 rounded
// to the nearest even (as at::BFloat16's conversion rounds), 16 at a time with AVX-512 (and BF16).
// With `stream`, each row's elements from its first 64-byte (bfloat16: 32-byte) boundary on go by
// non-temporal stores, those before it by ordinary ones; an sfence must follow before another
// thread reads them.
inline void store_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd,
                       bool stream) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    float* d = dst + r * ldd;
    int64_t c = 0;
#ifdef __AVX512F__
    if (stream) {
      c = std::min<int64_t>(cols, to_boundary(d, 64) / static_cast<int64_t>(sizeof(float)));
      std::memcpy(d, s, c * sizeof(float));
      for (; c + 16 <= cols; c += 16) _mm512_stream_ps(d + c, _mm512_loadu_ps(s + c));
    }
#endif
    if (c < cols) std::memcpy(d + c, s + c, (cols - c) * sizeof(float));
  }
}

inline void store_rows(const float* src, int64_t lds, int64_t rows, int64_t cols, at::BFloat16* dst, int64_t ldd,
                       bool stream) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    at::BFloat16* d = dst + r * ldd;
    int64_t c = 0;
#ifdef __AVX512BF16__
    if (stream) {
      for (const int64_t head = std::min<int64_t>(cols, to_boundary(d, 32) / 2); c < head; ++c)
        d[c] = static_cast<at::BFloat16>(s[c]);
      for (; c + 16 <= cols; c += 16)
        _mm256_stream_si256(reinterpret_cast<__m256i*>(d + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + c)));
    }
    for (; c + 16 <= cols; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + c)));
#endif
    for (; c < cols; ++c) d[c] = static_cast<at::BFloat16>(s[c]);
  }
}

// Output 0 in windows: a window is a run of consecutive products into outs[0] on the same
// columns (c_col, N), the first writing (add == 0, or K == 0: zeroing), the others adding; no two
// windows share a column, and together they cover every column (a column no window writes would
// keep what the output buffer held). Then each window accumulates in a small float32 buffer
// (tile x N: 64-128 KB, in L2) and is stored (rounded) into the output when its last product is done
// (bfloat16 always; float32 for outputs of at least `stream_bytes`, streamed), instead
// of a float32 copy of the whole tile row (tile x width: 2 MB for a 4096-wide output, 16 KB
// between rows) rounded at the tile's end. Measured (bfloat16, 16 groups into a 4096-wide output,
// 4096 rows, one thread, AMX): products of K 96, N 128 6.5 -> 4.6 ms, K 192, N 256 14.6 -> 11.8,
// K 512, N 256 25.8 -> 23.8 (the rest is the output's write). `last[i]` is set where window i's
// last product is; a product into another output closes the open window. False where the table is
// not like that (the scatter products: several groups add into the same columns). Returns the
// widest window's N (its buffer's width), 0 for such a table.
int64_t find_windows(const int64_t* P, int64_t n_products, int64_t width, std::vector<char>& last) {
  std::vector<char> covered(width, 0);
  int64_t c0 = -1, n = -1, open = -1, widest = 0;
  for (int64_t i = 0; i < n_products; ++i) {
    const int64_t* p = P + i * kProductFields;
    if (p[9] != 0) {   // another output (z = x V): the open window ends before it
      if (open >= 0) last[open] = 1;
      c0 = n = open = -1;
      continue;
    }
    if (p[7] == c0 && p[6] == n && p[8] != 0 && p[2] != 0) {   // adds to the open window
      open = i;
      continue;
    }
    if (p[8] != 0 && p[2] != 0) return 0;                       // adds outside a window of its own
    if (open >= 0) last[open] = 1;
    c0 = p[7], n = p[6], open = i, widest = std::max(widest, n);
    for (int64_t c = c0; c < c0 + n; ++c) {
      if (covered[c]) return 0;
      covered[c] = 1;
    }
  }
  if (open >= 0) last[open] = 1;
  return std::all_of(covered.begin(), covered.end(), [](char c) { return c != 0; }) ? widest : 0;
}

template <typename T>
void sweep_impl(int64_t rows, int64_t tile, int64_t panel, const std::vector<at::Tensor>& a_ops,
                const std::vector<at::Tensor>& b_ops, const std::vector<at::Tensor>& outs, const at::Tensor& products,
                const std::vector<at::Tensor>& g_a, const std::vector<at::Tensor>& g_b, const at::Tensor& grams,
                std::vector<at::Tensor>& accs, int64_t stream_bytes, const at::Tensor& stages,
                const at::Tensor& gathers) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  const int64_t n_stages = stages.numel() ? stages.size(0) : 0;
  const int64_t* S = stages.data_ptr<int64_t>();
  const int64_t n_products = products.numel() ? products.size(0) : 0;
  const int64_t n_grams = grams.numel() ? grams.size(0) : 0;
  const int64_t* P = products.data_ptr<int64_t>();
  const int64_t* G = grams.data_ptr<int64_t>();
  // the gathers before product i: rows [g_first[i], g_first[i + 1]) of `gathers` (sorted by product)
  const int64_t n_gathers = gathers.numel() ? gathers.size(0) : 0;
  const int64_t* GA = gathers.data_ptr<int64_t>();
  std::vector<int64_t> g_first(n_products + 1);
  int64_t gather_width = 0;
  for (int64_t i = 0, j = 0; i <= n_products; ++i) {
    for (; j < n_gathers && GA[j * kGatherFields] < i; ++j)
      gather_width = std::max(gather_width, GA[j * kGatherFields + 4] + GA[j * kGatherFields + 3]);
    g_first[i] = j;
  }

  // which gram operands a panel must transpose (A) or repack whole (B: a float32 operand of a bfloat16
  // sweep; bfloat16 ones are packed slice by slice), and how wide they are
  std::vector<char> transposed(g_a.size(), 0), repacked(g_b.size(), 0);
  int64_t slice_n = 0;   // bfloat16 B operands in the sweep's dtype: each gram's slice packed on its own
  for (int64_t i = 0; i < n_grams; ++i) {
    const int64_t* q = G + i * kGramFields;
    transposed[q[0]] = 1;
    const bool whole = !kF32 && g_b[q[3]].scalar_type() == at::kFloat;
    repacked[q[3]] = whole;
    if (!kF32 && !whole) slice_n = std::max(slice_n, q[5]);
  }
  int64_t t_width = 0, v_width = 0;
  for (size_t a = 0; a < g_a.size(); ++a) t_width += transposed[a] ? g_a[a].size(1) : 0;
  for (size_t b = 0; b < g_b.size(); ++b) v_width += repacked[b] ? g_b[b].size(1) : 0;
  const int64_t k_panel = panel + (kF32 ? 0 : panel % 2);
  // float32 operands of a bfloat16 sweep (x under autocast): rounded per tile (A) or per panel
  // (grams) into a thread's scratch, instead of a bfloat16 copy of the whole tensor made first
  auto wide = [](const at::Tensor& x) { return !kF32 && x.scalar_type() == at::kFloat; };
  int64_t a_width = 0, g_width = 0;
  for (const auto& a : a_ops) a_width += wide(a) ? a.size(1) : 0;
  for (size_t a = 0; a < g_a.size(); ++a) g_width = std::max(g_width, transposed[a] && wide(g_a[a]) ? g_a[a].size(1) : 0);
  for (size_t b = 0; b < g_b.size(); ++b) g_width = std::max(g_width, repacked[b] && wide(g_b[b]) ? g_b[b].size(1) : 0);
  // output 0 may be float32 in a bfloat16 sweep (dX under autocast): stored without rounding
  auto store_out = [&](const float* src, int64_t lds, int64_t m, int64_t n, const at::Tensor& out, int64_t r0,
                       int64_t col, bool streamed) {
    if (wide(out))
      store_rows(src, lds, m, n, out.data_ptr<float>() + r0 * out.stride(0) + col, out.stride(0), streamed);
    else
      store_rows(src, lds, m, n, out.data_ptr<T>() + r0 * out.stride(0) + col, out.stride(0), streamed);
  };
  // rows [r0, r0 + n) of a wide operand rounded into dst (ld: its width)
  auto round_rows = [](const at::Tensor& x, int64_t r0, int64_t n, T* dst) {
    store_rows(x.data_ptr<float>() + r0 * x.stride(0), x.stride(0), n, x.size(1), dst, x.size(1), false);
  };
  // use(src, lds, r, n) on a panel's rows [p0, p0 + m) of a gram operand in the sweep's type: in place
  // at once (r = 0, n = m), or a wide one rounded kStrip rows at a time into `strip` (kept in L1)
  constexpr int64_t kStrip = 16;
  auto panel_rows = [&](const at::Tensor& x, int64_t p0, int64_t m, T* strip, auto use) {
    if (!wide(x)) return use(x.data_ptr<T>() + p0 * x.stride(0), x.stride(0), int64_t(0), m);
    for (int64_t r = 0; r < m; r += kStrip) {
      const int64_t n = std::min(kStrip, m - r);
      round_rows(x, p0 + r, n, strip);
      use(strip, x.size(1), r, n);
    }
  };

  std::vector<char> last(n_products, 0);
  // float32 products write in place, except into a large output of windows (streamed); bfloat16 ones
  // always accumulate in float32 first
  const bool stream = kStreams && n_products && outs[0].numel() * outs[0].element_size() >= stream_bytes;
  const int64_t window_n = n_products && (!kF32 || stream) ? find_windows(P, n_products, outs[0].size(1), last) : 0;
  const bool windowed = window_n > 0;

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
    // scratch, uninitialised: every element is written before it is read (std::vector would zero it,
    // ~1 MB per call at one thread: bf16 layer fwd+bwd of the released 1024 -> 4096 at 16 rows, medians
    // of 41 in alternating processes, 3.27 -> 3.11 ms)
    Scratch<T> t_buffer(n_grams ? t_width * k_panel : 0), v_buffer(n_grams ? v_width * k_panel : 0);
    Scratch<T> s_buffer(slice_n * k_panel);   // one gram's B slice in VNNI (L2-resident)
    Scratch<T> a_scratch(tile * a_width), g_scratch(n_grams ? kStrip * g_width : 0);
    Scratch<T> gathered(tile * gather_width);   // a tile's gathered A (`gathers`)
    std::vector<const T*> a_base(a_ops.size(), nullptr);   // a tile's rounded rows, for wide A operands
    // float32 accumulators, stored once: output 0's window (windowed) or, bfloat16, the tile's rows of each
    // output (each column written by its first product, or zeroed by a K = 0 one, before any adds)
    std::vector<Scratch<float>> c_buffer;
    for (size_t c = 0; c < (kF32 ? size_t(windowed) : outs.size()); ++c)
      c_buffer.emplace_back(tile * (c == 0 && windowed ? window_n : outs[c].size(1)));
    // transposed (A) and repacked (B) gram operands of the current panel: where in the buffers, and whether done
    std::vector<T*> t_slot(g_a.size(), nullptr), v_slot(g_b.size(), nullptr);
    {
      T* next = t_buffer.data();
      for (size_t a = 0; a < g_a.size(); ++a)
        if (transposed[a]) t_slot[a] = next, next += g_a[a].size(1) * k_panel;
      T* vnext = v_buffer.data();
      for (size_t b = 0; b < g_b.size(); ++b)
        if (repacked[b]) v_slot[b] = vnext, vnext += g_b[b].size(1) * k_panel;
    }
    std::vector<char> t_done(g_a.size()), v_done(g_b.size());

    // the tile's rows of wide A operands rounded into the scratch (bfloat16 sweeps of float32 x)
    auto round_tile = [&](int64_t r0, int64_t m) {
      T* a_next = a_scratch.data();
      for (size_t a = 0; a < a_ops.size(); ++a) {
        if (!wide(a_ops[a])) continue;
        round_rows(a_ops[a], r0, m, a_next);
        a_base[a] = a_next;
        a_next += tile * a_ops[a].size(1);
      }
    };
    // products [i0, i1) on rows [r0, r0 + m)
    auto run_products = [&](int64_t i0, int64_t i1, int64_t r0, int64_t m) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t* p = P + i * kProductFields;
        for (int64_t j = g_first[i]; j < g_first[i + 1]; ++j) {   // this product's gathered A
          const int64_t* h = GA + j * kGatherFields;
          const at::Tensor& src = a_ops[h[1]];
          const bool rounded = a_base[h[1]] != nullptr;
          const T* from = (rounded ? a_base[h[1]] : src.data_ptr<T>() + r0 * src.stride(0)) + h[2];
          const int64_t lds = rounded ? src.size(1) : src.stride(0);
          for (int64_t r = 0; r < m; ++r)
            std::memcpy(gathered.data() + r * gather_width + h[4], from + r * lds, h[3] * sizeof(T));
        }
        const int64_t K = p[2], N = p[6], cid = p[9];
        const at::Tensor& out = outs[cid];
        const bool local = windowed && cid == 0;   // output 0 in windows (find_windows)
        const bool in_place = kF32 && !local;
        float* c = in_place ? reinterpret_cast<float*>(out.data_ptr()) + r0 * out.stride(0) + p[7]
                            : c_buffer[cid].data() + (local ? 0 : p[7]);
        const int64_t ldc = in_place ? out.stride(0) : local ? N : out.size(1);
        if (K == 0) {
          for (int64_t r = 0; r < m; ++r) std::memset(c + r * ldc, 0, N * sizeof(float));
        } else if (p[0] < 0) {   // the gathered A
          product(m, N, K, gather_width, p[5], ldc, p[8] != 0, gathered.data() + p[1], b_ops[p[3]].data_ptr<T>(),
                  p[4], c);
        } else {
          const at::Tensor& a = a_ops[p[0]];
          const bool rounded = a_base[p[0]] != nullptr;
          product(m, N, K, rounded ? a.size(1) : a.stride(0), p[5], ldc, p[8] != 0,
                  (rounded ? a_base[p[0]] : a.data_ptr<T>() + r0 * a.stride(0)) + p[1], b_ops[p[3]].data_ptr<T>(),
                  p[4], c);
        }
        if (!in_place && (cid != 0 || (local && last[i])))   // read by later products, or a window done
          store_out(c, ldc, m, N, out, r0, p[7], local && stream);
      }
    };
    // bfloat16 without windows: the tile's float32 rows of output 0 rounded once its products are done
    auto end_tile = [&](int64_t r0, int64_t m) {
      if (!kF32 && n_products && !windowed)
        store_out(c_buffer[0].data(), outs[0].size(1), m, outs[0].size(1), outs[0], r0, 0, false);
    };
    // grams [j0, j1) over the panel's rows [p0, p0 + m) (K = m, rounded up to even for bfloat16): each
    // operand transposed (A) or repacked whole (B) on its first use in the panel, so that a staged
    // sweep transposes an operand its own products write (gz, for dV) after them
    auto run_grams = [&](int64_t j0, int64_t j1, int64_t p0, int64_t m, bool add, const int64_t*& packed) {
      const int64_t km = m + (kF32 ? 0 : m % 2);
      for (int64_t i = j0; i < j1; ++i) {
        const int64_t* q = G + i * kGramFields;
        if (!t_done[q[0]]) {
          const int64_t w = g_a[q[0]].size(1);
          T* dst = t_slot[q[0]];
          panel_rows(g_a[q[0]], p0, m, g_scratch.data(), [&](const T* src, int64_t lds, int64_t r, int64_t n) {
            pixelfly::transpose(src, lds, n, w, dst + r, km);   // transpose16.h
          });
          for (int64_t c = 0; c < w; ++c)   // K padded with zeros (bfloat16: an odd panel)
            for (int64_t r = m; r < km; ++r) dst[c * km + r] = T(0);
          t_done[q[0]] = 1;
        }
        if (repacked[q[3]] && !v_done[q[3]]) {
          const int64_t w = g_b[q[3]].size(1);
          T* dst = v_slot[q[3]];
          panel_rows(g_b[q[3]], p0, m, g_scratch.data(), [&](const T* src, int64_t lds, int64_t r, int64_t n) {
            pack_vnni(reinterpret_cast<const at::BFloat16*>(src), lds, n, w,
                      reinterpret_cast<at::BFloat16*>(dst) + r * w);
          });
          v_done[q[3]] = 1;
        }
        const at::Tensor& b = g_b[q[3]];
        at::Tensor& acc = own[tid][q[6]];
        float* c = acc.data_ptr<float>() + q[7] * acc.stride(0) + q[8];
        const T* a = t_slot[q[0]] + q[1] * km;
        if (kF32) {
          product(q[2], q[5], km, km, b.stride(0), acc.stride(0), add, a, b.data_ptr<T>() + p0 * b.stride(0), q[4], c);
        } else if (repacked[q[3]]) {
          product(q[2], q[5], km, km, b.size(1), acc.stride(0), add, a, v_slot[q[3]], q[4], c);
        } else {
          // the panel's rows of this slice packed right before the grams that read it (a group's runs
          // and extra rows share one): kept in L2, where packing the whole panel first (4096 columns:
          // 2 MB at 256 rows) wrote past it
          if (!packed || packed[3] != q[3] || packed[4] != q[4] || packed[5] != q[5]) {
            pack_vnni(reinterpret_cast<const at::BFloat16*>(b.data_ptr<T>() + p0 * b.stride(0) + q[4]), b.stride(0), m,
                      q[5], reinterpret_cast<at::BFloat16*>(s_buffer.data()));
            packed = q;
          }
          product(q[2], q[5], km, km, q[5], acc.stride(0), add, a, s_buffer.data(), 0, c);
        }
      }
    };

    for (int64_t t = next_panel++; t < n_panels; t = next_panel++) {
      const int64_t p0 = t * panel, p1 = std::min(rows, p0 + panel), m = p1 - p0;
      std::fill(t_done.begin(), t_done.end(), 0);
      std::fill(v_done.begin(), v_done.end(), 0);
      const bool add = touched[tid] != 0;
      const int64_t* packed = nullptr;   // the gram whose B slice s_buffer holds
      if (n_stages == 0) {   // every tile's products, then the panel's grams
        for (int64_t r0 = p0; r0 < p1; r0 += tile) {
          const int64_t mt = std::min(tile, p1 - r0);
          round_tile(r0, mt);
          run_products(0, n_products, r0, mt);
          end_tile(r0, mt);
        }
        run_grams(0, n_grams, p0, m, add, packed);
      } else {   // one tile per panel: each stage's products, then its grams, while their operands are in cache
        round_tile(p0, m);
        for (int64_t s = 0; s < n_stages; ++s) {
          run_products(S[4 * s], S[4 * s + 1], p0, m);
          run_grams(S[4 * s + 2], S[4 * s + 3], p0, m, add, packed);
        }
        end_tile(p0, m);
      }
      if (n_grams) touched[tid] = 1;
    }
    at::native::cpublas::brgemm_release(!kF32);
#ifdef __AVX512F__
    if (stream) _mm_sfence();   // the streamed rows visible before the caller (another thread) reads them
#endif
  });

  if (!n_grams) return;
  // accs = sum of the touched threads' copies (zero when no thread had a panel)
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

}  // namespace

// See the file's header. Operands float32 (`bfloat16` false), or bfloat16 with B operands in VNNI
// (`bfloat16` true; then A and gram operands and output 0 may also be float32: x and dX under
// autocast, rounded per tile or per strip of a panel, and stored unrounded); `accs` float32, written (not added
// to): the sum over all rows. An output 0 of at least `stream_bytes` whose products
// form windows (find_windows) is accumulated per window and written by streaming stores (store_rows).
// `stages` (n, 4) int64: empty for the usual order, or consecutive (product, gram) ranges covering
// both lists, run stage by stage on each panel (one tile per panel; see the file's header).
// `gathers` (n, 5) int64: empty, or the column ranges copied side by side into a tile's gathered A
// before the products that read it (A id -1; see the file's header).
void sweep(bool bfloat16, int64_t rows, int64_t tile, int64_t panel,
           std::vector<at::Tensor> a_ops, std::vector<at::Tensor> b_ops, std::vector<at::Tensor> outs, at::Tensor products,
           std::vector<at::Tensor> g_a, std::vector<at::Tensor> g_b, at::Tensor grams, std::vector<at::Tensor> accs,
           int64_t stream_bytes, at::Tensor stages, at::Tensor gathers) {
  TORCH_CHECK(tile > 0 && panel > 0, "tile and panel must be positive");
  TORCH_CHECK(products.scalar_type() == at::kLong && products.is_contiguous() &&
              (products.numel() == 0 || products.size(1) == kProductFields), "products: (n, 10) contiguous int64");
  TORCH_CHECK(grams.scalar_type() == at::kLong && grams.is_contiguous() &&
              (grams.numel() == 0 || grams.size(1) == kGramFields), "grams: (n, 9) contiguous int64");
  TORCH_CHECK(products.device().is_cpu() && grams.device().is_cpu() && stages.device().is_cpu() &&
              gathers.device().is_cpu(), "products, grams, stages and gathers: CPU tensors");
  TORCH_CHECK(!a_ops.empty(), "a_ops: at least one operand");
  const at::ScalarType dtype = bfloat16 ? at::kBFloat16 : at::kFloat;
  check_operands(a_ops, dtype, "a_ops", bfloat16);
  check_operands(g_a, dtype, "g_a", bfloat16);
  check_operands(g_b, dtype, "g_b", bfloat16);
  check_operands({outs.begin(), outs.begin() + std::min<size_t>(1, outs.size())}, dtype, "outs", bfloat16);
  check_operands({outs.begin() + std::min<size_t>(1, outs.size()), outs.end()}, dtype, "outs");
  check_operands(accs, at::kFloat, "accs");
  for (const auto& a : a_ops)   // a float32 A operand is rounded once per tile: no product may write it
    TORCH_CHECK(a.scalar_type() == dtype || outs.empty() || !a.is_alias_of(outs[0]),
                "a_ops: a float32 operand of a bfloat16 sweep may not be its output 0");
  for (const auto& b : b_ops)
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == dtype && b.is_contiguous(), "b_ops: contiguous, the sweep's dtype");
  // every table entry inside its operands (the Python side builds them; a wrong one would read or
  // write outside a tensor, so they are checked here once per call: O(entries))
  const int64_t n_p = products.numel() ? products.size(0) : 0, n_g = grams.numel() ? grams.size(0) : 0;
  const int64_t* PT = products.data_ptr<int64_t>();
  const int64_t* GT = grams.data_ptr<int64_t>();
  // gathers: (product, A id, first column, width, scratch column), sorted by product; the scratch is
  // as wide as the widest gather reaches, and a product reading it (A id -1) stays inside it
  TORCH_CHECK(gathers.scalar_type() == at::kLong && gathers.is_contiguous() &&
              (gathers.numel() == 0 || (gathers.dim() == 2 && gathers.size(1) == kGatherFields)),
              "gathers: (n, 5) contiguous int64");
  const int64_t n_h = gathers.numel() ? gathers.size(0) : 0;
  const int64_t* HT = gathers.data_ptr<int64_t>();
  // each product's gathers fill columns [0, filled) side by side, from operands no later product
  // writes (z = x V before them); a product reading the gathered A stays inside what the last gathers
  // filled (in table order, which every tile and stage follows)
  std::vector<int64_t> last_write(outs.size(), -1);   // the last product writing each output
  for (int64_t i = 0; i < n_p; ++i) {
    const int64_t c = PT[i * kProductFields + 9];
    TORCH_CHECK(c >= 0 && c < (int64_t)outs.size(), "products: operand out of range");
    last_write[c] = i;
  }
  std::vector<int64_t> filled_at(n_p, -1);   // columns of the gathered A filled once product i's gathers ran
  for (int64_t j = 0, filled = -1; j < n_h; ++j) {
    const int64_t* h = HT + j * kGatherFields;
    TORCH_CHECK(h[0] >= 0 && h[0] < n_p && (j == 0 || h[0] >= HT[(j - 1) * kGatherFields]),
                "gathers: products in range and in order");
    TORCH_CHECK(h[1] >= 0 && h[1] < (int64_t)a_ops.size() && a_ops[h[1]].size(0) >= rows && h[2] >= 0 && h[3] > 0 &&
                h[2] + h[3] <= a_ops[h[1]].size(1), "gathers: A slice out of range");
    const bool first = j == 0 || h[0] != HT[(j - 1) * kGatherFields];
    TORCH_CHECK(h[4] == (first ? 0 : filled), "gathers: a product's pieces side by side from column 0");
    for (size_t c = 0; c < outs.size(); ++c)
      TORCH_CHECK(!outs[c].numel() || !a_ops[h[1]].is_alias_of(outs[c]) || last_write[c] < h[0],
                  "gathers: an operand read before the last product that writes it");
    filled = filled_at[h[0]] = h[4] + h[3];
  }
  for (int64_t i = 0, filled = 0; i < n_p; ++i) {
    const int64_t* p = PT + i * kProductFields;
    TORCH_CHECK(p[0] >= -1 && p[0] < (int64_t)a_ops.size() && p[2] >= 0 && p[6] > 0, "products: operand out of range");
    const at::Tensor& c = outs[p[9]];
    TORCH_CHECK(c.size(0) >= rows && p[7] >= 0 && p[7] + p[6] <= c.size(1), "products: output slice out of range");
    filled = filled_at[i] >= 0 ? filled_at[i] : filled;
    if (p[2] == 0) continue;
    TORCH_CHECK(p[0] >= 0 || (p[1] >= 0 && p[1] + p[2] <= filled), "products: gathered A slice out of range");
    const at::Tensor& a = p[0] >= 0 ? a_ops[p[0]] : a_ops[0];
    TORCH_CHECK(p[3] >= 0 && p[3] < (int64_t)b_ops.size(), "products: B out of range");
    const at::Tensor& b = b_ops[p[3]];
    const int64_t k0 = p[5] > 0 ? p[4] / p[5] : -1, n0 = p[5] > 0 ? p[4] % p[5] : -1;
    TORCH_CHECK(p[0] < 0 || (a.size(0) >= rows && p[1] >= 0 && p[1] + p[2] <= a.size(1)),
                "products: A slice out of range");
    TORCH_CHECK(k0 >= 0 && n0 + p[6] <= p[5] && (k0 + p[2]) * p[5] <= b.numel(), "products: B slice out of range");
  }
  for (int64_t i = 0; i < n_g; ++i) {
    const int64_t* q = GT + i * kGramFields;
    TORCH_CHECK(q[0] >= 0 && q[0] < (int64_t)g_a.size() && q[3] >= 0 && q[3] < (int64_t)g_b.size() &&
                q[6] >= 0 && q[6] < (int64_t)accs.size() && q[2] > 0 && q[5] > 0, "grams: operand out of range");
    const at::Tensor &a = g_a[q[0]], &b = g_b[q[3]], &acc = accs[q[6]];
    TORCH_CHECK(a.size(0) >= rows && b.size(0) >= rows && q[1] >= 0 && q[1] + q[2] <= a.size(1) && q[4] >= 0 &&
                q[4] + q[5] <= b.size(1) && q[7] >= 0 && q[7] + q[2] <= acc.size(0) && q[8] >= 0 &&
                q[8] + q[5] <= acc.size(1), "grams: slice out of range");
  }
  if (dtype == at::kBFloat16) {   // its micro-kernels read K in pairs (VNNI): every K and B row offset even
    const int64_t* P = products.data_ptr<int64_t>();
    for (int64_t i = 0; i < (products.numel() ? products.size(0) : 0); ++i) {
      const int64_t* p = P + i * kProductFields;
      TORCH_CHECK(p[2] % 2 == 0 && (p[2] == 0 || (p[4] / p[5]) % 2 == 0),
                  "products: bfloat16 needs even K and even B row offsets (an even block size)");
    }
  }
  // stages: (first product, end, first gram, end) rows that together run every product and every gram
  // once, in table order; one tile per panel (each stage's products run on the whole panel)
  TORCH_CHECK(stages.scalar_type() == at::kLong && stages.is_contiguous() &&
              (stages.numel() == 0 || (stages.dim() == 2 && stages.size(1) == 4)), "stages: (n, 4) contiguous int64");
  if (stages.numel()) {
    TORCH_CHECK(tile >= panel, "stages: one tile per panel only (tile >= panel)");
    const int64_t* S = stages.data_ptr<int64_t>();
    int64_t p_end = 0, g_end = 0;
    for (int64_t s = 0; s < stages.size(0); ++s) {
      TORCH_CHECK(S[4 * s] == p_end && S[4 * s + 1] >= p_end && S[4 * s + 2] == g_end && S[4 * s + 3] >= g_end,
                  "stages: consecutive ranges of the tables, in order");
      p_end = S[4 * s + 1], g_end = S[4 * s + 3];
    }
    TORCH_CHECK(p_end == n_p && g_end == n_g, "stages: must cover every product and every gram");
    // a gram reading an output of the products (gz, for dV) must come after the stage of the last
    // product that writes it: a stage's grams run after its products
    std::vector<int64_t> last_writer(outs.size(), -1);   // stage of the last product into each output
    for (int64_t st = 0; st < stages.size(0); ++st)
      for (int64_t i = S[4 * st]; i < S[4 * st + 1]; ++i) last_writer[PT[i * kProductFields + 9]] = st;
    auto written_by = [&](const at::Tensor& x) {   // the latest stage writing an output x shares memory with
      int64_t st = -1;
      for (size_t c = 0; c < outs.size(); ++c)
        if (outs[c].numel() && x.is_alias_of(outs[c])) st = std::max(st, last_writer[c]);
      return st;
    };
    for (int64_t st = 0; st < stages.size(0); ++st)
      for (int64_t i = S[4 * st + 2]; i < S[4 * st + 3]; ++i) {
        const int64_t* q = GT + i * kGramFields;
        TORCH_CHECK(written_by(g_a[q[0]]) <= st && written_by(g_b[q[3]]) <= st,
                    "stages: a gram reads an output before the stage of the last product that writes it");
      }
  }
  if (!bfloat16)
    sweep_impl<float>(rows, tile, panel, a_ops, b_ops, outs, products, g_a, g_b, grams, accs, stream_bytes, stages,
                      gathers);
  else
    sweep_impl<at::BFloat16>(rows, tile, panel, a_ops, b_ops, outs, products, g_a, g_b, grams, accs, stream_bytes,
                             stages, gathers);
}

// Whether a product table's output 0 can be accumulated in windows (find_windows): by the sweep for
// bfloat16 always, for float32 where the output has at least `stream_bytes`.
bool windowed(at::Tensor products, int64_t width) {
  TORCH_CHECK(products.scalar_type() == at::kLong && products.is_contiguous() &&
              (products.numel() == 0 || products.size(1) == kProductFields), "products: (n, 10) contiguous int64");
  const int64_t n = products.numel() ? products.size(0) : 0;
  std::vector<char> last(n, 0);
  const int64_t* P = products.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(P[i * kProductFields + 9] != 0 || (P[i * kProductFields + 7] >= 0 &&
                P[i * kProductFields + 7] + P[i * kProductFields + 6] <= width), "products: output slice out of range");
  return n > 0 && find_windows(P, n, width, last) > 0;
}

// Which micro-kernels run bfloat16 products on VNNI-packed B here, as the sweep's bfloat16 path
// needs: "amx" (oneDNN packs for AMX tiles: Xeon Sapphire Rapids and later), "avx512_bf16" (no AMX,
// but the CPU has AVX512-BF16's pair dot products, which oneDNN's brgemm uses: AMD Zen 4 and later,
// Xeon Cooper Lake; confirmed once by a small product checked exactly), or "" (none: the sweep's
// bfloat16 path is off). torch's brgemm takes VNNI bfloat16 wherever oneDNN's ISA is at least
// avx512_core, but without BF16 instructions its kernels would emulate them. The probe cannot tell: a
// oneDNN limited by ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 on such a CPU passes it, emulating.
#if defined(__AVX512BF16__)   // built with -march=native: this CPU has AVX512-BF16
static bool bfloat16_probe() {
  constexpr int64_t m = 2, n = 16, k = 4;
  at::BFloat16 a[m * k], b[k * n];   // b in VNNI pairs: row pair p, column j -> b[(p * n + j) * 2 + q]
  float c[m * n], expect[m * n];
  for (int64_t i = 0; i < m * k; ++i) a[i] = static_cast<float>(i % 5 - 2);
  for (int64_t p = 0; p < k / 2; ++p)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t q = 0; q < 2; ++q) b[(p * n + j) * 2 + q] = static_cast<float>((2 * p + q + j) % 3 - 1);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0;
      for (int64_t kk = 0; kk < k; ++kk) sum += float(a[i * k + kk]) * float(b[((kk / 2) * n + j) * 2 + kk % 2]);
      expect[i * n + j] = sum;
    }
  try {
    at::native::cpublas::brgemm(m, n, k, k, n, n, false, a, b, c, true);
    at::native::cpublas::brgemm_release(true);
  } catch (const std::exception&) {
    return false;
  }
  return std::equal(c, c + m * n, expect);
}
#endif

std::string bfloat16_isa() {
  // oneDNN switched off (torch.backends.mkldnn): torch's brgemm refuses VNNI operands. Not probed then,
  // so that a probe made while it is off cannot stick.
  if (!at::globalContext().userEnabledMkldnn()) return "";
  if (at::native::cpublas::could_pack(at::kBFloat16)) return "amx";
#if defined(__AVX512BF16__)
  static const bool dot_products = bfloat16_probe();
#else
  constexpr bool dot_products = false;
#endif
  return dot_products ? "avx512_bf16" : "";
}


// ----------------------------------------------------------------------------- packing

// One block per (group c, block row r, block kk) of pack_blocks below: float32 rows copied (the
// block transposed 16 x 16 at a time where `swap`, transpose16.h), bfloat16 in VNNI pairs of rows;
// float32 blocks packed as bfloat16 (S float, T bfloat16) rounded first, as store_rows rounds.
// Each group's matrix has `rows` rows of blocks and `pitch` rows in all (extra rows below: the caller's).
template <typename S, typename T>
void pack_into(const S* src, const int64_t* idx, T* dst, int64_t count, int64_t n_rows, int64_t k, int64_t b,
               bool transpose, bool swap, int64_t pitch) {
  const int64_t cols = (transpose ? n_rows : k) * b;
  at::parallel_for(0, count * n_rows * k, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> rounded(std::is_same<S, T>::value ? 0 : b * b);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i / (n_rows * k), r = (i / k) % n_rows, kk = i % k;
      const int64_t row0 = (transpose ? kk : r) * b, col0 = (transpose ? r : kk) * b;
      const T* blk;
      if constexpr (std::is_same<S, T>::value) {
        blk = src + idx[i] * b * b;
      } else {
        store_rows(src + idx[i] * b * b, b, b, b, rounded.data(), b, false);
        blk = rounded.data();
      }
      T* base = dst + c * pitch * cols;
      if constexpr (std::is_same<T, at::BFloat16>::value) {   // rows row0.. (even, as b is) in pairs
        T* out = base + (row0 / 2) * cols * 2 + col0 * 2;
        if (!swap) {
          pack_vnni(blk, b, b, b, out, cols);
        } else {   // transposed: the pair (rows q, q+1; column p) is blk[p][q..q+1], one 32-bit word, so
          // the VNNI rows are the columns of blk read as a (b x b/2) matrix of 32-bit words (0.44 -> 0.24
          // ms for the released 1024 -> 4096's forward operands, one thread, from float32)
          pixelfly::transpose(reinterpret_cast<const word32*>(blk), b / 2, b, b / 2, reinterpret_cast<word32*>(out), cols);
        }
      } else if (!swap) {   // output rows written contiguously
        for (int64_t p = 0; p < b; ++p) std::memcpy(base + (row0 + p) * cols + col0, blk + p * b, b * sizeof(T));
      } else {
        pixelfly::transpose(blk, b, b, b, base + row0 * cols + col0, cols);
      }
    }
  });
}

// The groups' blocks as B operands, in one pass: out[c] is group c's blocks as one dense matrix
// (the layout of pixelfly_lab/ops/torch_plan.py's Plan.packed_all): with `transpose`, block (r, kk)
// of the group at rows kk*b.., columns r*b.. (M_g^T), else at rows r*b.., columns kk*b.. (M_g);
// each block transposed where `transpose` differs from `plan_transposed`; `bfloat16`: in the VNNI
// layout (pairs of rows interleaved), float32 values rounded. `extra_rows` more rows per group are
// left uninitialised below the blocks (the caller's: [U^T; bias] of a gathered forward).
// index: (count * n_rows * k) storage indices of the blocks.
at::Tensor pack_blocks(at::Tensor values, at::Tensor index, int64_t count, int64_t n_rows, int64_t k,
                       bool transpose, bool plan_transposed, bool bfloat16, int64_t extra_rows) {
  TORCH_CHECK(values.dim() == 3 && values.size(1) == values.size(2) && values.is_contiguous(),
              "values: contiguous (nnz, b, b)");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.numel() == count * n_rows * k,
              "index: count * n_rows * k int64 indices");
  const bool from_float = values.scalar_type() == at::kFloat;
  TORCH_CHECK(from_float || (bfloat16 && values.scalar_type() == at::kBFloat16),
              "values: float32, or bfloat16 packed as bfloat16");
  const int64_t b = values.size(1), nnz = values.size(0);
  const int64_t rows = (transpose ? k : n_rows) * b, cols = (transpose ? n_rows : k) * b;
  TORCH_CHECK(extra_rows >= 0, "extra_rows: not negative");
  TORCH_CHECK(!bfloat16 || (b % 2 == 0 && extra_rows % 2 == 0),
              "bfloat16 packing pairs rows: an even block size and extra_rows only");
  const bool swap = transpose != plan_transposed;
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i)
    TORCH_CHECK(idx[i] >= 0 && idx[i] < nnz, "index: out of range");
  const int64_t pitch = rows + extra_rows;
  at::Tensor out = bfloat16 ? at::empty({count, pitch / 2, cols, 2}, values.options().dtype(at::kBFloat16))
                            : at::empty({count, pitch, cols}, values.options());
  if (!bfloat16)
    pack_into(values.data_ptr<float>(), idx, out.data_ptr<float>(), count, n_rows, k, b, transpose, swap, pitch);
  else if (from_float)
    pack_into(values.data_ptr<float>(), idx, out.data_ptr<at::BFloat16>(), count, n_rows, k, b, transpose, swap, pitch);
  else
    pack_into(values.data_ptr<at::BFloat16>(), idx, out.data_ptr<at::BFloat16>(), count, n_rows, k, b, transpose, swap,
              pitch);
  return out;
}

// The inverse of pack_blocks(transpose=true) for float32 gradients: grad[index[i]] = block
// (r, kk) of grad_mt[c] (count, >= k*b rows, n_rows*b), transposed unless plan_transposed.
void unpack_blocks(at::Tensor grad_mt, at::Tensor index, int64_t n_rows, int64_t k, bool plan_transposed,
                   at::Tensor grad) {
  TORCH_CHECK(grad_mt.dim() == 3 && grad_mt.scalar_type() == at::kFloat && grad_mt.stride(2) == 1,
              "grad_mt: (count, rows, cols) float32, unit column stride");
  TORCH_CHECK(grad.dim() == 3 && grad.is_contiguous() && grad.scalar_type() == at::kFloat, "grad: contiguous float32");
  const int64_t b = grad.size(1), count = grad_mt.size(0);
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.numel() == count * n_rows * k,
              "index: count * n_rows * k int64 indices");
  TORCH_CHECK(grad_mt.size(1) >= k * b && grad_mt.size(2) == n_rows * b, "grad_mt: shape of the plan's groups");
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i)
    TORCH_CHECK(idx[i] >= 0 && idx[i] < grad.size(0), "index: out of range");
  const float* src = grad_mt.data_ptr<float>();
  float* dst = grad.data_ptr<float>();
  const int64_t s0 = grad_mt.stride(0), s1 = grad_mt.stride(1);
  at::parallel_for(0, count * n_rows * k, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i / (n_rows * k), r = (i / k) % n_rows, kk = i % k;
      const float* blk = src + c * s0 + kk * b * s1 + r * b;   // rows kk*b.., columns r*b..
      float* out = dst + idx[i] * b * b;
      if (plan_transposed) {
        for (int64_t p = 0; p < b; ++p) std::memcpy(out + p * b, blk + p * s1, b * sizeof(float));
      } else {
        pixelfly::transpose(blk, s1, b, b, out, b);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sweep", &sweep, "Tiled brgemm products and grams over rows (see blocksparse_cpu.cpp)");
  m.def("pack_blocks", &pack_blocks, "The groups' blocks as B operands (see blocksparse_cpu.cpp)");
  m.def("unpack_blocks", &unpack_blocks, "The blocks' gradients from the groups' accumulators");
  m.def("windowed", &windowed, "Whether the bfloat16 sweep accumulates a table's output 0 in windows");
  m.def("bfloat16_isa", &bfloat16_isa, "Which bfloat16 micro-kernels (VNNI B) run here: 'amx', 'avx512_bf16' or ''");
}
