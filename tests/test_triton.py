"""Triton block-sparse kernels against the dense reference x @ W.T, values and gradients.

The kernels are reached as users reach them: ``sparse_lowrank_matmul(..., backend='triton')``,
the torch custom op of :mod:`pixelfly_lab.ops.matmul` (autograd, autocast), and the launchers directly.

Without a GPU the kernels run in Triton's interpreter (numpy, CPU tensors, toy sizes):
TRITON_INTERPRET=1 must be set before triton is imported, so it is set here, before anything
imports triton or pixelfly_lab.ops.triton_kernels. The interpreter computes bfloat16 dots wrongly, so
bfloat16 is checked only by the CUDA tests, which are skipped when no GPU is present.
"""

import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pixelfly_lab.ops import matmul as kernels  # noqa: E402
from pixelfly_lab.ops import triton_kernels as tk  # noqa: E402

if not CUDA and not tk.INTERPRET:
    pytest.skip("no GPU, and triton_kernels was imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)

DEVICE = "cuda" if CUDA else "cpu"
# relative Frobenius error bounds against a float64 reference computed from the same inputs
TOL = {torch.float64: 1e-12, torch.float32: 5e-3 if CUDA else 1e-5, torch.float16: 3e-3,
       torch.bfloat16: 2e-2}


def triton_matmul(x, values, layout, bias=None, u=None, v=None):
    return kernels.sparse_lowrank_matmul(x, values, layout, u, v, bias, backend="triton")


def dense_weight(values: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """The reference: W (R*b, C*b) with values[k] at the k-th True entry of layout (row-major)."""
    R, C = layout.shape
    b = values.shape[-1]
    blocks = values.new_zeros(R, C, b, b).index_put((layout.to(values.device),), values)
    return blocks.permute(0, 2, 1, 3).reshape(R * b, C * b)


def random_layout(R: int, C: int, density: float, generator: torch.Generator) -> torch.Tensor:
    layout = torch.rand(R, C, generator=generator) < density
    if R > 1:
        layout[R - 1] = False  # one empty block row: its output is bias (+ low rank) only
    layout[0, 0] = True        # never empty
    return layout


def make_case(dtype, block, *, R=3, C=4, rows=(2, 19), rank=0, bias=True, seed=0, layout=None):
    """Random inputs of one case, all requiring grad: (x, values, layout, bias, u, v)."""
    g = torch.Generator().manual_seed(seed)
    layout = random_layout(R, C, 0.5, g) if layout is None else layout
    R, C = layout.shape
    nnz = int(layout.sum())

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        return t.to(device=DEVICE, dtype=dtype).requires_grad_()

    x = rand(*rows, C * block)
    values = rand(nnz, block, block, scale=block ** -0.5)
    b = rand(R * block) if bias else None
    u, v = (rand(R * block, rank, scale=rank ** -0.5), rand(C * block, rank)) if rank else (None, None)
    return x, values, layout, b, u, v


def reference(x, values, layout, bias=None, u=None, v=None):
    y = x @ dense_weight(values, layout).T
    if u is not None:
        y = y + (x @ v) @ u.T
    return y if bias is None else y + bias


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def check_against_reference(x, values, layout, bias, u, v, tol):
    """Values and every gradient of the Triton path against the float64 dense reference."""
    inputs = [t for t in (x, values, bias, u, v) if t is not None]
    y = triton_matmul(x, values, layout, bias, u, v)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.device)
    grads = torch.autograd.grad(y, inputs, dy.to(y.dtype))

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    args = dict(zip(["x", "values", "bias", "u", "v"], [x, values, bias, u, v]))
    it = iter(ref_inputs)
    ref_args = {k: (next(it) if t is not None else None) for k, t in args.items()}
    y_ref = reference(ref_args["x"], ref_args["values"], layout, ref_args["bias"], ref_args["u"], ref_args["v"])
    ref_grads = torch.autograd.grad(y_ref, ref_inputs, dy)

    assert y.dtype == x.dtype and y.shape == y_ref.shape
    assert rel_err(y, y_ref) < tol
    for name, got, want in zip([k for k, t in args.items() if t is not None], grads, ref_grads):
        assert got.dtype == args[name].dtype and got.shape == want.shape, name
        assert rel_err(got, want) < tol, name


@pytest.mark.parametrize("dtype,block", [(torch.float64, 16), (torch.float64, 32), (torch.float64, 64),
                                         (torch.float64, 128), (torch.float32, 16), (torch.float32, 32),
                                         (torch.float16, 16), (torch.float16, 64)])
def test_block_sparse_matches_dense(dtype, block):
    check_against_reference(*make_case(dtype, block), tol=TOL[dtype])


@pytest.mark.parametrize("dtype,rank", [(torch.float64, 5), (torch.float64, 70), (torch.float32, 3),
                                        (torch.float16, 8)])
def test_pixelfly_fused_lowrank_matches_dense(dtype, rank):
    # rank 70 > 64 walks the low-rank term in two masked chunks
    check_against_reference(*make_case(dtype, 16, rank=rank), tol=TOL[dtype])


def repeated_layout():
    """Block rows repeated in runs of 4 and columns in runs of 2, one run of rows empty."""
    base = torch.tensor([[True, False, True], [False, False, False]])
    return torch.kron(base.int(), torch.ones(4, 2, dtype=torch.int)).bool()


@pytest.mark.parametrize("dtype,block,rank", [(torch.float64, 16, 3), (torch.float16, 16, 0),
                                              (torch.float32, 64, 5), (torch.float64, 128, 0)])
def test_grouped_programs_match_dense(dtype, block, rank):
    """Layouts whose rows/columns repeat: one program computes several output blocks.

    At block 128 a tile holds only 2 of the 4 repeated rows, so each run is split in two programs.
    """
    layout = repeated_layout()
    tables = tk.layout_tables(layout)
    assert (tables.row_group, tables.col_group) == (4, 2)
    check_against_reference(*make_case(dtype, block, rank=rank, layout=layout), tol=TOL[dtype])


def test_flat_block_butterfly_layout_matches_dense():
    from pixelfly_lab.structure.masks import flat_block_butterfly_layout

    layout = flat_block_butterfly_layout(256, 128, 4, 1, 16)  # each cell stretched to 4 x 2 blocks
    tables = tk.layout_tables(layout)
    assert (tables.row_group, tables.col_group) == (8, 4)
    check_against_reference(*make_case(torch.float64, 16, rows=(33,), rank=2, layout=layout), tol=1e-12)


def test_no_bias_and_leading_dims():
    x, values, layout, _, _, _ = make_case(torch.float64, 16, rows=(2, 3, 5), bias=False)
    check_against_reference(x, values, layout, None, None, None, tol=TOL[torch.float64])


def test_empty_layout_gives_bias_only():
    layout = torch.zeros(2, 2, dtype=torch.bool)
    x = torch.randn(5, 32, dtype=torch.float64, device=DEVICE, requires_grad=True)
    values = torch.zeros(0, 16, 16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.randn(32, dtype=torch.float64, device=DEVICE)
    y = triton_matmul(x, values, layout, bias)
    assert torch.equal(y, bias.expand(5, 32))
    dx, dvalues = torch.autograd.grad(y.sum(), [x, values])
    assert torch.equal(dx, torch.zeros_like(x)) and dvalues.shape == (0, 16, 16)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_every_output_element_written(split):
    """Launchers into NaN-filled buffers: no NaN survives, and the results match the reference."""
    x, values, layout, bias, u, v = [t.detach() if t is not None else None
                                     for t in make_case(torch.float64, 16, rows=(300,), rank=4)]
    tables = tk.layout_tables(layout, x.device)
    W = dense_weight(values, layout)
    nan = float("nan")
    y = tk.dsd_matmul(x, values, tables, bias=bias, lowrank=(x @ v, u),
                      out=torch.full((300, 48), nan, dtype=x.dtype, device=DEVICE))
    torch.testing.assert_close(y, x @ W.T + bias + (x @ v) @ u.T)
    g = torch.randn(300, 48, dtype=x.dtype, device=DEVICE)
    dx = tk.dsd_matmul(g, values, tables, transpose=True, out=torch.full_like(x, nan))
    torch.testing.assert_close(dx, g @ W)
    # split > 1 reduces float32/64 partial sums over row chunks (300 rows, chunks of 128)
    dvalues = tk.sdd_matmul(g, x, tables, 16, split=split, out=torch.full_like(values, nan))
    expected = (g.T @ x).reshape(3, 16, 4, 16).permute(0, 2, 1, 3)[layout]  # the layout's blocks of dW
    torch.testing.assert_close(dvalues, expected)


@settings(max_examples=6, deadline=None)
@given(R=st.integers(1, 4), C=st.integers(1, 4), block=st.sampled_from([16, 32]), rows=st.integers(1, 70),
       rank=st.sampled_from([0, 3]), seed=st.integers(0, 2 ** 16))
def test_random_shapes_match_dense(R, C, block, rows, rank, seed):
    check_against_reference(*make_case(torch.float64, block, R=R, C=C, rows=(rows,), rank=rank, seed=seed),
                            tol=TOL[torch.float64])


@settings(max_examples=30, deadline=None)
@given(R=st.integers(1, 6), C=st.integers(1, 6), density=st.floats(0.0, 1.0), seed=st.integers(0, 2 ** 16))
def test_layout_tables_describe_the_layout(R, C, density, seed):
    layout = torch.rand(R, C, generator=torch.Generator().manual_seed(seed)) < density
    t = tk.layout_tables(layout)
    rows, cols = layout.nonzero(as_tuple=True)
    assert t.shape == (R, C) and t.nnz == len(rows)
    assert t.row_ptr.tolist() == [0] + layout.sum(1).cumsum(0).tolist()
    assert t.row_cols.tolist() == cols.tolist() and t.block_rows.tolist() == rows.tolist()
    assert t.col_ptr.tolist() == [0] + layout.sum(0).cumsum(0).tolist()
    for j in range(C):  # column j's entries: its blocks k, rows ascending
        ks = t.col_blocks[t.col_ptr[j]:t.col_ptr[j + 1]].long()
        assert (cols[ks] == j).all() and t.col_rows[t.col_ptr[j]:t.col_ptr[j + 1]].tolist() == rows[ks].tolist()
        assert t.col_rows[t.col_ptr[j]:t.col_ptr[j + 1]].tolist() == sorted(rows[ks].tolist())
    assert sorted(t.col_blocks.tolist()) == list(range(t.nnz))
    assert t.max_row_fanin == max(layout.sum(1).tolist()) and t.max_col_fanin == max(layout.sum(0).tolist())
    for group, lay in ((t.row_group, layout), (t.col_group, layout.T)):  # runs of equal rows
        n = lay.shape[0]
        assert n % group == 0 and all(torch.equal(lay[q], lay[q - q % group]) for q in range(n))
        if 2 * group <= 16 and n % (2 * group) == 0:
            assert any(not torch.equal(lay[q], lay[q - q % (2 * group)]) for q in range(n))


@settings(max_examples=20, deadline=None)
@given(R=st.integers(1, 4), C=st.integers(1, 4), gr=st.sampled_from([1, 2, 4]), gc=st.sampled_from([1, 2]),
       seed=st.integers(0, 2 ** 16))
def test_layout_tables_find_repeated_rows(R, C, gr, gc, seed):
    base = torch.rand(R, C, generator=torch.Generator().manual_seed(seed)) < 0.5
    t = tk.layout_tables(torch.kron(base.int(), torch.ones(gr, gc, dtype=torch.int)).bool())
    assert t.row_group % gr == 0 and t.col_group % gc == 0


def test_layout_tables_cache():
    layout = torch.tensor([[True, False], [True, True]])
    first = tk.layout_tables(layout)
    assert tk.layout_tables(layout) is first
    assert tk.layout_tables(layout.clone()) is first  # same content: same tables
    layout[0, 1] = True                                # in-place change: new tables
    assert tk.layout_tables(layout).nnz == 4


def test_tables_of_a_key_are_built_once_in_the_registry():
    """The ops take a layer's key: its tables come from the registry's one cache, built once per device."""
    from pixelfly_lab.ops import registry

    key = registry.register_layout(torch.tensor([[True, True, False], [False, True, True]]), 16)
    first = tk.tables_for(key, "cpu")
    builds = registry.derived_count()
    assert tk.tables_for(key, "cpu") is first and registry.derived_count() == builds
    assert registry.derived(key, "triton_tables", None, "cpu") is first   # the registry's entry, no rebuild
    assert first.nnz == 4 and first.row_cols.tolist() == [0, 1, 1, 2]


@pytest.mark.skipif(not hasattr(torch, "get_autocast_dtype"), reason="needs torch.get_autocast_dtype")
def test_autocast_float16():
    """Under autocast the kernels compute in the autocast dtype; gradients return in the parameters' dtype."""
    x, values, layout, bias, _, _ = make_case(torch.float32, 16)
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = triton_matmul(x, values, layout, bias)
    assert y.dtype == torch.float16
    grads = torch.autograd.grad(y.float().sum(), [x, values, bias])
    assert [g.dtype for g in grads] == [torch.float32] * 3
    half = [t.detach().half().double().requires_grad_() for t in (x, values, bias)]
    y_ref = reference(half[0], half[1], layout, half[2])
    assert rel_err(y, y_ref) < TOL[torch.float16]
    for got, want in zip(grads, torch.autograd.grad(y_ref.sum(), half)):
        assert rel_err(got, want) < TOL[torch.float16]


def test_bad_input_names_the_argument():
    x, values, layout, bias, _, _ = [t.detach() if isinstance(t, torch.Tensor) else t
                                     for t in make_case(torch.float32, 16)]
    with pytest.raises(ValueError, match="values"):
        triton_matmul(x, values[1:], layout)
    with pytest.raises(ValueError, match="block sizes"):
        triton_matmul(x[..., :32], values[:, :8, :8], layout)
    with pytest.raises(ValueError, match="in_features"):
        triton_matmul(x[..., :16], values, layout)
    with pytest.raises(ValueError, match="bias"):
        triton_matmul(x, values, layout, bias[:-1])
    with pytest.raises(ValueError, match="layout"):
        triton_matmul(x, values, layout.int())
    with pytest.raises(TypeError, match="values has dtype"):
        triton_matmul(x, values.double(), layout)
    with pytest.raises(ValueError, match="u must be"):
        triton_matmul(x, values, layout, None, torch.ones(5, 2, device=DEVICE), torch.ones(64, 2, device=DEVICE))
    with pytest.raises(ValueError, match="values is on meta"):
        triton_matmul(x, values.to("meta"), layout)
    with pytest.raises(TypeError, match="dtype"):  # an integer dtype the kernels do not support
        tk.check_operands(x.reshape(-1, 64).int(), values.int(), tk.layout_tables(layout, x.device))


def test_grid_is_one_dimensional_so_millions_of_rows_fit(monkeypatch):
    """CUDA grids allow 2^31 - 1 programs on axis 0 but 65535 on axes 1 and 2."""
    grids = []
    monkeypatch.setattr(tk, "_launch", lambda kernel, args, meta, grid, *rest: grids.append(grid(1, 16)))
    layout = torch.ones(2, 3, dtype=torch.bool)
    rows = 2 ** 22
    x = torch.empty(rows, 3 * 16, device="meta")
    tk.dsd_matmul(x, torch.empty(6, 16, 16, device="meta"), tk.layout_tables(layout, "meta"))
    assert grids == [(2 * rows // 16,)]


TF32_API = """
import torch
from pixelfly_lab.ops.matmul import tf32_allowed
matmul = torch.backends.cuda.matmul
seen = [tf32_allowed()]
matmul.allow_tf32 = True                       # the legacy API
seen.append(tf32_allowed())
matmul.allow_tf32 = False
seen.append(tf32_allowed())
if hasattr(matmul, "fp32_precision"):          # the new API (torch >= 2.9): legacy reads may raise now
    matmul.fp32_precision = "tf32"
    seen.append(tf32_allowed())
    matmul.fp32_precision = "ieee"
    seen.append(tf32_allowed())
print(seen)
"""


def test_tf32_detection_reads_both_torch_apis():
    out = subprocess.run([sys.executable, "-c", TF32_API], check=True, capture_output=True, text=True).stdout
    seen = eval(out)
    assert seen[:3] == [False, True, False] and seen[3:] in ([], [True, False])


@pytest.mark.parametrize("capability,dtype,tf32,block,wins", [
    ((9, 0), torch.bfloat16, False, 64, True), ((8, 0), torch.float16, False, 128, True),
    ((7, 5), torch.bfloat16, False, 64, False),    # no bf16 tensor cores before sm_80
    ((9, 0), torch.float32, True, 64, True), ((9, 0), torch.float32, False, 64, False),  # FMA: cuBLAS wins
    ((9, 0), torch.float64, True, 64, False), ((9, 0), torch.bfloat16, False, 8, False)])
def test_auto_sends_to_triton_only_where_it_wins(monkeypatch, capability, dtype, tf32, block, wins):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(kernels, "tf32_allowed", lambda: tf32)
    assert kernels._triton_wins(0, dtype, block) == wins


def test_package_import_does_not_import_triton():
    code = "import sys, pixelfly_lab, pixelfly_lab.cli; assert 'triton' not in sys.modules, 'triton imported'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block", tk.BLOCK_SIZES)
def test_cuda_all_blocks_and_dtypes(dtype, block):
    """On a GPU: every block size and dtype, tuned kernels, several programs per block row."""
    check_against_reference(*make_case(dtype, block, R=4, C=6, rows=(3, 200), rank=8), tol=TOL[dtype])
    check_against_reference(*make_case(dtype, block, R=4, C=6, rows=(1000,)), tol=TOL[dtype])


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_autocast_bfloat16():
    x, values, layout, bias, u, v = make_case(torch.float32, 64, rows=(256,), rank=8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = triton_matmul(x, values, layout, bias, u, v)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y.float().sum(), [x, values, bias, u, v])
    assert all(g.dtype == torch.float32 for g in grads)
    assert rel_err(y, reference(x.double(), values.double(), layout, bias.double(), u.double(), v.double())) < 2e-2
