"""The compiled row sweep of the 'torch' path (float32; bfloat16 on CPUs with AMX or AVX512-BF16) against
the float64 reference.

Skipped where the kernel cannot be built (no compiler), except under CI=true: the CI machine has one,
and a kernel that silently stopped building would leave users on the slower path.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

from pixelfly_lab.nn.layers import PixelflyLinear
from pixelfly_lab.ops import native, native_linear, native_tables, torch_grouped, torch_kernels
from pixelfly_lab.ops.matmul import blocks_to_dense
from pixelfly_lab.structure.masks import flat_block_butterfly_layout

if native.load("blocksparse_cpu") is None:
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError("the compiled kernel blocksparse_cpu did not build on the CI machine")
    pytest.skip("the compiled kernel cannot be built here (no compiler?)", allow_module_level=True)

F32, F64 = torch.float32, torch.float64
STREAM_BYTES = native_linear.STREAM_BYTES   # the outputs the tests make are smaller: 0 makes them count as large
LAYOUTS = {
    "expanding": (flat_block_butterfly_layout(256, 64, 8, 2, 4), 4),     # gather plan
    "contracting": (flat_block_butterfly_layout(64, 256, 8, 2, 4), 4),   # scatter plan
    "square": (flat_block_butterfly_layout(128, 128, 8, 2, 8), 8),
    "random": (torch.rand(16, 8, generator=torch.Generator().manual_seed(4)) < 0.45, 4),   # 2-5 runs per group
    "holes": (torch.tensor([[True, False, False, True], [False, False, False, False], [True, True, False, True]]), 4),
}
LAYOUTS["holes-16"] = (LAYOUTS["holes"][0], 16)   # windows (and zeroed ones) of whole 64-byte lines
LAYOUTS["random-T"] = (LAYOUTS["random"][0].T.contiguous(), 4)
LAYOUTS["holes-T"] = (LAYOUTS["holes"][0].T.contiguous(), 4)


def _operands(layout, b, rows, rank, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    R, C = layout.shape

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F32)
    return (rand(rows, C * b), rand(int(layout.sum()), b, b), rand(R * b) if bias else None,
            rand(R * b, rank) if rank else None, rand(C * b, rank) if rank else None)


def _reference(layout, gy, operands):
    """y and the gradients of (x, values, bias, u, v) in float64 from the float32 operands."""
    leaves = [t if t is None else t.to(F64).requires_grad_() for t in operands]
    x, values, bias, u, v = leaves
    w = blocks_to_dense(values, layout) + (u @ v.T if u is not None else 0)
    y = torch.nn.functional.linear(x, w, bias)
    used = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, used, gy.to(F64)))
    return y.detach(), [None if t is None else next(grads) for t in leaves]


def _close(got, want):
    scale = want.abs().max().item() + 1.0
    torch.testing.assert_close(got.to(F64), want, rtol=1e-4, atol=1e-5 * scale)   # float32 sums of <= 130 terms


@pytest.mark.parametrize("rows,tile", [(7, 2), (130, 64), (1, 64), (64, 64)])
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("rank,bias", [(0, True), (3, True), (3, False), (0, False)])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("staged", [True, False])
def test_sweep_matches_reference(name, rank, bias, rows, tile, stream, staged, monkeypatch):
    """Values and every gradient, both plan orientations, groups of several runs, empty rows and
    columns, rows that are not a multiple of the tile; with ``stream`` every output counts as large
    (a gather table's products then accumulate per window and are stored by streaming stores); the
    float32 backward of a plan that gathers x staged (one tile per panel) and in the usual order
    (several tiles per panel)."""
    monkeypatch.setattr(native_linear, "STAGED", staged)
    monkeypatch.setattr(native_linear, "TILE_ROWS", tile)
    monkeypatch.setattr(native_linear, "STREAM_BYTES", 0 if stream else STREAM_BYTES)
    layout, b = LAYOUTS[name]
    ops = _operands(layout, b, rows, rank, bias)
    plan = torch_kernels.plan_for(layout, b)
    y, z = native_linear.native_forward(*ops, plan, layout.shape[0] * b)
    gy = torch.linspace(-1, 1, y.numel(), dtype=F32).reshape(y.shape)   # not all-ones: catches mixups
    y_ref, g_ref = _reference(layout, gy, ops)
    _close(y, y_ref)
    if rank:
        _close(z, ops[0].to(F64) @ ops[4].to(F64))
    needs = tuple(t is not None for t in ops)
    grads = native_linear.native_backward(gy, ops[0], ops[1], ops[3], ops[4], z, plan, needs, bias)
    for got, want in zip(grads, g_ref):
        assert (got is None) == (want is None)
        if want is not None:
            _close(got, want)


@pytest.mark.parametrize("needs", [(False, True, False, False, False), (True, False, False, False, False),
                                   (False, False, True, True, False), (False, False, False, False, True),
                                   (True, False, True, False, True)])
@pytest.mark.parametrize("name", ["expanding", "contracting", "holes"])
def test_backward_computes_only_what_is_asked(name, needs):
    layout, b = LAYOUTS[name]
    ops = _operands(layout, b, 9, 3, True)
    plan = torch_kernels.plan_for(layout, b)
    y, z = native_linear.native_forward(*ops, plan, layout.shape[0] * b)
    gy = torch.linspace(-1, 1, y.numel(), dtype=F32).reshape(y.shape)
    _, g_ref = _reference(layout, gy, ops)
    grads = native_linear.native_backward(gy, ops[0], ops[1], ops[3], ops[4], z, plan, needs, True)
    for need, got, want in zip(needs, grads, g_ref):
        assert (got is not None) == need
        if need:
            _close(got, want)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("name", ["expanding", "contracting", "random", "holes-16"])
def test_threads_share_the_panels(name, threads, monkeypatch):
    """Several OpenMP threads taking panels of 2 rows from the shared counter (their own gradient
    accumulators, summed at the end) give the reference's results, also when some thread gets no
    panel (2 rows: one panel)."""
    monkeypatch.setattr(native_linear, "PANEL_ROWS", 2)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (2, 11, 130):
            for stream in (False, True):
                for staged in (True, False):
                    test_sweep_matches_reference(name, 3, True, rows, 2, stream, staged, monkeypatch)
    finally:
        torch.set_num_threads(previous)


def test_zero_rows():
    layout, b = LAYOUTS["expanding"]
    ops = _operands(layout, b, 0, 3, True)
    plan = torch_kernels.plan_for(layout, b)
    y, z = native_linear.native_forward(*ops, plan, layout.shape[0] * b)
    assert y.shape == (0, layout.shape[0] * b)
    grads = native_linear.native_backward(torch.zeros_like(y), ops[0], ops[1], ops[3], ops[4], z, plan,
                                          (True,) * 5, True)
    assert all(g is not None and not g.abs().any() for g in grads[1:])


def test_layer_takes_the_compiled_sweep_and_matches_the_pytorch_path(monkeypatch):
    """A float32 PixelflyLinear on the CPU runs the compiled sweep (spied), with the values and
    gradients of the pure-PyTorch grouped path (PIXELFLY_NATIVE=0)."""
    torch.manual_seed(0)
    layer = PixelflyLinear(256, 512, budget=0.25, block_size=16, backend="torch")
    x = torch.randn(300, 256, requires_grad=True)
    calls = []
    real = native_linear.native_forward
    monkeypatch.setattr(torch_kernels, "native_forward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(torch_kernels, "dense_gemm_wins", lambda *a: False)

    def run():
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape))
        return [y.detach()] + [t.grad.clone() for t in [x, *layer.parameters()]]
    native_results = run()
    assert calls, "the compiled sweep was not taken"
    monkeypatch.setenv("PIXELFLY_NATIVE", "0")
    calls.clear()
    grouped_results = run()
    assert not calls
    for got, want in zip(native_results, grouped_results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_grouped_path_is_what_runs_without_the_kernel(monkeypatch):
    monkeypatch.setenv("PIXELFLY_NATIVE", "0")
    assert not native.enabled()
    assert native.load("blocksparse_cpu") is None
    x = torch.zeros(4, 8)
    assert not native_linear.native_applies(x, torch.zeros(1, 4, 4))
    monkeypatch.setenv("PIXELFLY_NATIVE", "1")
    assert native_linear.native_applies(x, torch.zeros(1, 4, 4))
    assert not native_linear.native_applies(x.double(), torch.zeros(1, 4, 4).double())   # float32 only
    assert not native_linear.native_applies(x.T, torch.zeros(1, 4, 4))                   # unit column stride


def test_unknown_source_is_a_value_error():
    with pytest.raises(ValueError, match="name"):
        native.load("no_such_kernel")


def test_tables_are_cached_per_plan():
    layout, b = LAYOUTS["expanding"]
    plan = torch_kernels.plan_for(layout, b)
    first = native_linear.product_tables(plan, "gather", 4, 1024)
    assert native_linear.product_tables(plan, "gather", 4, 1024) is first
    assert first.shape[1] == 10 and native_linear.product_tables(plan, "gram", 0, 0).shape[1] == 9
    assert torch_grouped.unpack_grads is native_linear.unpack_grads


def _cpu_flags() -> set[str]:
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.skipif(native.load("blocksparse_cpu") is None, reason="the kernel cannot be built here")
def test_bfloat16_isa_names_this_cpus_micro_kernels():
    """'amx' where oneDNN packs for AMX tiles, 'avx512_bf16' where the CPU has AVX512-BF16 and the
    probe's product came out exact, '' where the CPU has neither or oneDNN is switched off: a CPU
    with either flag (and oneDNN on) must not lose the bfloat16 sweep to a failing probe."""
    isa, flags = native_linear.bfloat16_isa(), _cpu_flags()
    assert isa in ("amx", "avx512_bf16", "")
    if isa == "amx":
        assert "amx_bf16" in flags
    if isa == "avx512_bf16":
        assert "avx512_bf16" in flags
    if flags & {"amx_bf16", "avx512_bf16"} and torch.backends.mkldnn.is_available() and \
            "ONEDNN_MAX_CPU_ISA" not in os.environ and torch.backends.mkldnn.enabled:
        assert isa
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        assert native_linear.bfloat16_isa() == "" and not native_linear.native_takes(torch.bfloat16, "cpu")
        with pytest.raises(RuntimeError, match="AVX512-BF16"):
            native_linear._kernels(torch.bfloat16)
    finally:
        torch.backends.mkldnn.enabled = previous
    assert native_linear.bfloat16_isa() == isa and native_linear._kernels(torch.float32) == ""


@pytest.mark.skipif(not native_linear.bfloat16_isa(), reason="no bfloat16 micro-kernels here")
def test_bfloat16_isa_asked_first_with_onednn_off_comes_back():
    """A process whose first question comes while oneDNN is switched off gets '' then, and the
    kernels once it is back on (a probe refused while off must not stick for the process)."""
    code = ("import torch; from pixelfly_lab.ops import native_linear as nl; torch.backends.mkldnn.enabled = False; "
            "off = nl.bfloat16_isa(); torch.backends.mkldnn.enabled = True; print(repr(off), repr(nl.bfloat16_isa()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["''", repr(native_linear.bfloat16_isa())]


needs_bf16 = pytest.mark.skipif(not native_linear.native_takes(torch.bfloat16, "cpu"),
                                reason="this CPU has no bfloat16 VNNI micro-kernels (AMX or AVX512-BF16)")


def _bfloat16_rows(monkeypatch, tile: int | None = None, panel: int | None = None) -> None:
    """The bfloat16 sweep's tile and panel rows for this CPU's micro-kernels, for one test."""
    isa = native_linear.bfloat16_isa()
    if tile is not None:
        monkeypatch.setitem(native_linear.TILE_ROWS_16BIT, isa, tile)
    if panel is not None:
        monkeypatch.setitem(native_linear.PANEL_ROWS_16BIT, isa, panel)


@needs_bf16
@pytest.mark.parametrize("rows", [7, 130])
@pytest.mark.parametrize("name", ["expanding", "contracting", "holes", "random"])
@pytest.mark.parametrize("rank,bias", [(0, True), (3, True), (4, False), (5, True), (0, False)])
@pytest.mark.parametrize("n_split", [native_tables.N_SPLIT, 8, 2])
@pytest.mark.parametrize("gathered", [True, False])
def test_bfloat16_sweep_matches_reference(name, rank, bias, rows, n_split, gathered, monkeypatch):
    """bfloat16 operands (B in VNNI pairs, K padded to the micro-kernels' step, float32 accumulation): the float64
    reference to bfloat16 rounding (a few 1e-3 of the largest value), gradients in bfloat16. With
    n_split 8 or 2 a group's output is cut into pieces (2: every group's, also the holes' groups of
    4 rows, zeroed by K = 0 products without rank and bias), each accumulated in a window of its own.
    The forward with each group's A gathered (runs and [z, 1] as one product) and without."""
    monkeypatch.setattr(native_linear, "GATHERED", (torch.bfloat16,) if gathered else ())
    _bfloat16_rows(monkeypatch, tile=64 if rows > 64 else 4, panel=128 if rows > 64 else 7)   # panels of several
    # tiles, and an odd panel
    monkeypatch.setattr(native_tables, "N_SPLIT", n_split)
    monkeypatch.setattr(native_tables, "_TABLES", {})   # tables built with this split
    monkeypatch.setattr(native_linear, "STREAM_BYTES", 0 if n_split != 2 else STREAM_BYTES)   # streamed
    layout, b = LAYOUTS[name]
    ops = tuple(None if t is None else t.bfloat16() for t in _operands(layout, b, rows, rank, bias))
    plan = torch_kernels.plan_for(layout, b)
    y, z = native_linear.native_forward(*ops, plan, layout.shape[0] * b)
    gy = torch.linspace(-1, 1, y.numel()).reshape(y.shape).bfloat16()
    y_ref, g_ref = _reference(layout, gy, ops)
    assert y.dtype == torch.bfloat16

    def close(got, want):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.to(F64), want, rtol=0, atol=1.5e-2 * (want.abs().max().item() + 1e-3))
    close(y, y_ref)
    grads = native_linear.native_backward(gy, ops[0], ops[1], ops[3], ops[4], z, plan,
                                          tuple(t is not None for t in ops), bias)
    for got, want in zip(grads, g_ref):
        assert (got is None) == (want is None)
        if want is not None:
            close(got, want)


@needs_bf16
def test_autocast_layer_takes_the_compiled_sweep_with_an_unpadded_plan(monkeypatch):
    """Under torch.autocast('cpu', bfloat16) a PixelflyLinear runs the bfloat16 sweep on the plan
    of the layout itself (no zero blocks), x and the parameters uncast (float32, rounded inside),
    with the gradients the float64 layer has, to bfloat16 rounding of the operands it was given."""
    torch.manual_seed(0)
    layer = PixelflyLinear(256, 512, budget=0.25, block_size=16, backend="torch")
    x = torch.randn(96, 256, requires_grad=True)
    seen = []
    real = native_linear.native_forward
    monkeypatch.setattr(torch_kernels, "native_forward",
                        lambda *a: seen.append((a[0].dtype, a[1].dtype, a[5], a[7])) or real(*a))
    monkeypatch.setattr(torch_kernels, "dense_gemm_wins", lambda *a: False)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    gy = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    y.float().backward(gy)
    grads_bf16 = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    assert seen and seen[0][:2] == (torch.float32, torch.float32)    # x and the blocks as they came: rounded
    assert seen[0][-1] == torch.bfloat16                              # inside the sweep, which computes in bf16
    assert all(g.zero_at is None for g in seen[0][2].groups)         # the unpadded plan
    assert x.grad.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads_bf16)
    # the float32 sums themselves, not bfloat16 results cast back (autograd casts either way)
    assert all(not torch.equal(g, g.bfloat16().float()) for g in [x.grad, *grads_bf16])
    # the float64 layer on the operands the sweep saw (x, parameters and gy rounded to bfloat16):
    # what is left is the sweep's own rounding (float32 sums, bfloat16 outputs)
    ref = copy.deepcopy(layer).to(torch.bfloat16).double()
    x64 = x.detach().bfloat16().double().requires_grad_()
    y64 = ref(x64)
    y64.backward(gy.bfloat16().double())
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=1e-2 * y64.abs().max().item())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=1e-2 * x64.grad.abs().max().item())
    for got, want in zip(grads_bf16, [p.grad for p in ref.parameters()]):   # values, bias, u, v
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-2 * want.abs().max().item())


@pytest.mark.parametrize("route", ["sweep", "grouped", "dense"])
def test_float32_parameters_of_a_bfloat16_product_take_every_route(route, monkeypatch):
    """The 'torch' path asked to compute in bfloat16 from float32 x and parameters: the compiled
    sweep rounds them itself (CPUs with AMX or AVX512-BF16), the PyTorch grouped GEMMs and the dense
    GEMM get them cast; either way y in bfloat16 as from the operands rounded first, and the gradients in float32."""
    if route == "sweep" and not native_linear.native_takes(torch.bfloat16, "cpu", 4):
        pytest.skip("this CPU has no bfloat16 VNNI micro-kernels (AMX or AVX512-BF16)")
    if route != "sweep":
        monkeypatch.setattr(torch_kernels, "native_applies", lambda *a: False)
    monkeypatch.setattr(torch_kernels, "dense_gemm_wins", lambda *a: route == "dense")
    layout, b = LAYOUTS["expanding"]
    ops = _operands(layout, b, 70, 3, True)
    plan = torch_kernels.plan_for(layout, b)
    y, z = torch_kernels.sparse_lowrank_forward(*ops, plan, layout.shape[0] * b, torch.bfloat16)
    rounded = tuple(t.bfloat16() for t in ops)
    y_bf16, z_bf16 = torch_kernels.sparse_lowrank_forward(*rounded, plan, layout.shape[0] * b)
    assert y.dtype == z.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_bf16.float(), rtol=0, atol=1e-2 * y_bf16.abs().max().item())
    gy = torch.linspace(-1, 1, y.numel()).reshape(y.shape).bfloat16()
    x, values, _, u, v = ops
    grads = torch_kernels.sparse_lowrank_backward(gy, x, values, u, v, z, plan, (True,) * 5, True, torch.bfloat16)
    want = torch_kernels.sparse_lowrank_backward(gy, *rounded[:2], *rounded[3:], z_bf16, plan, (True,) * 5, True)
    for got, ref in zip(grads, want):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref.float(), rtol=0, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("rank,bias", [(3, True), (0, True), (3, False)])
def test_gradients_share_no_storage(name, rank, bias):
    """A custom op's outputs may not alias each other or its inputs (the bias's and U's gradients
    are slices of one accumulator here, copied apart)."""
    layout, b = LAYOUTS[name]
    ops = _operands(layout, b, 9, rank, bias)
    plan = torch_kernels.plan_for(layout, b)
    y, z = native_linear.native_forward(*ops, plan, layout.shape[0] * b)
    grads = native_linear.native_backward(torch.ones_like(y), ops[0], ops[1], ops[3], ops[4], z, plan,
                                          tuple(t is not None for t in ops), bias)
    storages = [g.untyped_storage().data_ptr() for g in grads if g is not None]
    inputs = {t.untyped_storage().data_ptr() for t in (*ops, y, z) if t is not None}
    assert len(set(storages)) == len(storages) and not set(storages) & inputs


@needs_bf16
@pytest.mark.parametrize("threads", [1, 2])
def test_bfloat16_threads_share_the_panels(threads, monkeypatch):
    _bfloat16_rows(monkeypatch, panel=4)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name in ("expanding", "contracting", "random"):
            test_bfloat16_sweep_matches_reference(name, 3, True, 130, 8, True, monkeypatch)
    finally:
        torch.set_num_threads(previous)


@needs_bf16
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["expanding", "contracting", "random", "random-T", "holes-T"])
@pytest.mark.parametrize("rank,bias", [(0, True), (3, True), (3, False)])
@pytest.mark.parametrize("rows,panel", [(37, 7), (75, 35)])
def test_float32_x_with_bfloat16_values_is_the_bfloat16_sweep_on_rounded_x(name, rank, bias, threads, rows, panel,
                                                                          monkeypatch):
    """x in float32 with bfloat16 parameters (what autocast passes): the sweep rounds x's tiles and
    panels itself (A operand; transposed or VNNI-packed gram operand, 16 rows at a time) and stores
    dX unrounded. The bfloat16 sweep given x.bfloat16(), bit for bit (x holds no subnormals, which
    the vector rounding flushes): y, z and the parameters' gradients equal, dX equal after
    rounding; rows that are not a multiple of the tile, odd panels (35: strips of 16, 16 and 3),
    1-2 threads."""
    _bfloat16_rows(monkeypatch, tile=4, panel=panel)
    monkeypatch.setattr(native_linear, "STREAM_BYTES", 0)   # output windows, streamed
    layout, b = LAYOUTS[name]
    x, *params = _operands(layout, b, rows, rank, bias)
    params = [None if t is None else t.bfloat16() for t in params]
    plan = torch_kernels.plan_for(layout, b)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = []
        for x2 in (x, x.bfloat16()):
            y, z = native_linear.native_forward(x2, *params, plan, layout.shape[0] * b)
            gy = torch.linspace(-1, 1, y.numel()).reshape(y.shape).bfloat16()
            needs = (True, True, bias, bool(rank), bool(rank))
            runs.append((y, z, native_linear.native_backward(gy, x2, params[0], params[2], params[3], z, plan, needs,
                                                             bias)))
    finally:
        torch.set_num_threads(previous)
    (y, z, grads), (y16, z16, grads16) = runs
    assert y.dtype == torch.bfloat16 and torch.equal(y, y16)
    assert (z is None and z16 is None) or torch.equal(z, z16)
    assert grads[0].dtype == torch.float32 and torch.equal(grads[0].bfloat16(), grads16[0])
    assert not torch.equal(grads[0], grads16[0].float())   # unrounded
    for got, want in zip(grads[1:], grads16[1:]):
        assert (got is None) == (want is None)
        assert got is None or (got.dtype == torch.bfloat16 and torch.equal(got, want))


@pytest.mark.parametrize("n_split", [native_tables.N_SPLIT, 2])
@pytest.mark.parametrize("low_k", [0, 32])
def test_gather_tables_accumulate_in_windows_and_scatter_tables_do_not(n_split, low_k, monkeypatch):
    """The bfloat16 sweep rounds a gather table's products per output window (each slice's products
    consecutive, the first writing, every column covered once); a scatter table (several groups add
    into the same columns) and a table with a slice unwritten keep the per-tile buffer. A gather table
    is the forward of a plan that gathers x, and dX of a transposed plan."""
    monkeypatch.setattr(native_tables, "N_SPLIT", n_split)
    monkeypatch.setattr(native_tables, "_TABLES", {})
    module = native.load("blocksparse_cpu")
    for name in ("expanding", "contracting", "holes", "random", "random-T"):
        layout, b = LAYOUTS[name]
        plan = torch_kernels.plan_for(layout, b)
        out, into = layout.shape[0] * b, layout.shape[1] * b
        gather, scatter = (into, out) if plan.transposed else (out, into)   # each table's output width
        lead = (scatter, len(plan.groups) + 1, 32) if low_k else ()
        table = native_linear.product_tables(plan, "gather", low_k, gather, lead)
        assert module.windowed(table, gather), name
        first = int((table[:, 9] == 0).nonzero()[0])
        without_first = torch.cat([table[:first], table[first + 1:]])   # a slice unwritten, or added to first
        assert not module.windowed(without_first, gather), name
        assert not module.windowed(native_linear.product_tables(plan, "scatter", low_k, scatter), scatter), name


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("rank,bias", [(0, True), (3, True), (4, False), (0, False)])
@pytest.mark.parametrize("rows", [7, 130])
def test_gathered_products_are_the_usual_ones(name, rank, bias, rows, monkeypatch):
    """Each group's runs and its low-rank operand copied side by side per tile and read by one
    product per output slice (the gathers; float32 here, so that any CPU runs it), in a gather
    table: the forward of a plan that gathers x, dX of a transposed plan. y, z and dX as the usual
    table gives them, to float32 rounding (the same products, K summed in one micro-kernel call)."""
    monkeypatch.setattr(native_linear, "TILE_ROWS", 16)   # several tiles, the last one short
    layout, b = LAYOUTS[name]
    ops = _operands(layout, b, rows, rank, bias)
    plan = torch_kernels.plan_for(layout, b)
    gy = torch.linspace(-1, 1, rows * layout.shape[0] * b).reshape(rows, -1)
    runs = {}
    for gathered in ((torch.float32,), ()):
        monkeypatch.setattr(native_linear, "GATHERED", gathered)
        y, z = native_linear.native_forward(*ops, plan, layout.shape[0] * b)
        grads = native_linear.native_backward(gy, ops[0], ops[1], ops[3], ops[4], z, plan,
                                              tuple(t is not None for t in ops), bias)
        runs[gathered] = (y, z, grads)
    (y, z, grads), (y_usual, z_usual, grads_usual) = runs.values()
    torch.testing.assert_close(y, y_usual, rtol=1e-5, atol=1e-5)
    assert (z is None) == (z_usual is None) and (z is None or torch.equal(z, z_usual))
    for got, want in zip(grads, grads_usual):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    y_ref, g_ref = _reference(layout, gy, ops)
    _close(y, y_ref)
    _close(grads[0], g_ref[0])


@pytest.mark.parametrize("name", ["expanding", "contracting", "square", "holes-16"])
@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_in_one_pass_is_the_plans_packing(name, transpose, dtype):
    """pack_blocks (a stacked plan's blocks in one compiled pass: rows copied or 16 x 16 transposes,
    bfloat16 in VNNI pairs, float32 values rounded on the way; with extra rows below each group's
    blocks) bit for bit what the plan's own packing and a cast give, in both orientations."""
    layout, b = LAYOUTS[name]
    plan = torch_kernels.plan_for(layout, b)
    values = torch.randn(int(layout.sum()), b, b)
    for source in {values, values.to(dtype)}:
        got = native_linear._packed(source, plan, transpose, dtype)
        want = [None if m is None else native_linear._right(m, dtype=dtype)   # a group without blocks
                for m in plan.packed_all(values.to(dtype), transpose)]
        assert len(got) == len(want) and all(g.numel() == 0 if w is None else torch.equal(g, w)
                                             for g, w in zip(got, want)), (name, source.dtype)
    if transpose:   # (K_g x n_g) B operands: [U^T; bias]-like rows below each group's blocks
        width = len(plan.groups) * (plan.groups[0].r1 - plan.groups[0].r0)
        extra = torch.randn(4, width)
        got = native_linear._packed(values, plan, transpose, dtype, extra)
        want = [native_linear._right(extra[:, g.r0:g.r1] if m is None else torch.cat([m, extra[:, g.r0:g.r1]]),
                                     dtype=dtype) for m, g in zip(plan.packed_all(values, transpose), plan.groups)]
        assert all(torch.equal(g, w) for g, w in zip(got, want)), name


def test_gathered_tables_read_each_group_once():
    """One product per output slice; a group of several pieces (runs of x, [z, 1]) reads them from
    the gathered A, copied in order right before its first product, K their widths together; a group
    of one piece reads it in place."""
    layout, b = LAYOUTS["random-T"]   # 2-5 runs per group, and a plan that gathers x
    plan = torch_kernels.plan_for(layout, b)
    low_k = 6
    table, gathers = native_tables.gathered_products(plan, low_k, (layout.shape[1] * b, len(plan.groups) + 1, 5))
    assert table[0, 9] == 1 and (table[1:, 9] == 0).all()   # the lead z = x V first, then output 0 only
    slices = table[1:]
    covered = torch.zeros(layout.shape[0] * b, dtype=torch.int)
    for p in slices.tolist():
        covered[p[7]:p[7] + p[6]] += 1
    assert (covered == 1).all()
    for i, g in enumerate(plan.groups):
        rows_i = [j for j, p in enumerate(table.tolist()) if p[3] == i and p[9] == 0]
        pieces = [(0, c0, c1 - c0) for c0, c1 in g.runs] + [(1, 0, low_k)]
        mine = [h for h in gathers.tolist() if h[0] == rows_i[0]]
        assert all(table[j, 2] == sum(w for *_, w in pieces) for j in rows_i)
        if len(pieces) > 1:
            assert all(table[j, 0] == -1 for j in rows_i)
            assert [tuple(h[1:4]) for h in mine] == pieces
            assert [h[4] for h in mine] == [sum(w for *_, w in pieces[:k]) for k in range(len(pieces))]
        else:
            assert not mine and table[rows_i[0], 0] == pieces[0][0]


def test_sweep_refuses_gathers_outside_their_operands():
    """The sweep checks every gather: in product order, inside its A operand, a product's pieces side
    by side from column 0, none reading an output before the last product that writes it; and a
    product reading the gathered A inside what the gathers before it (in table order) filled."""
    run = native.load("blocksparse_cpu").sweep
    x, y, b_op = torch.ones(4, 8), torch.empty(4, 4), torch.ones(8, 4)
    table = torch.tensor([[-1, 0, 8, 0, 0, 4, 4, 0, 0, 0]])   # y = gathered (4 x 8) @ B

    def sweep(gathers, product=table):
        run(False, 4, 4, 4, [x], [b_op], [y], product, [], [], native_tables.NO_GRAMS, [], 0,
            native_linear._NO_STAGES, torch.tensor(gathers, dtype=torch.long).reshape(-1, 5))
    sweep([[0, 0, 4, 4, 0], [0, 0, 0, 4, 4]])   # x's halves swapped: accepted
    torch.testing.assert_close(y, torch.full((4, 4), 8.0))
    with pytest.raises(RuntimeError, match="A slice out of range"):
        sweep([[0, 0, 6, 4, 0], [0, 0, 0, 4, 4]])
    with pytest.raises(RuntimeError, match="in order"):
        sweep([[1, 0, 0, 4, 0]])
    with pytest.raises(RuntimeError, match="gathered A slice out of range"):
        sweep([[0, 0, 0, 4, 0]])   # the product reads 8 columns, the gathers fill 4
    with pytest.raises(RuntimeError, match="side by side"):
        sweep([[0, 0, 0, 4, 0], [0, 0, 4, 4, 6]])   # a gap: columns 4 and 5 never filled
    with pytest.raises(RuntimeError, match="side by side"):
        sweep([[0, 0, 0, 8, 2]])
    twice = torch.cat([table, table])   # a second product reading the gathered A: the first one's gathers
    sweep([[0, 0, 0, 8, 0]], twice)
    with pytest.raises(RuntimeError, match="gathered A slice out of range"):
        sweep([[1, 0, 0, 8, 0]], twice)   # the first product would read what no gather filled yet
    z = torch.empty(4, 8)   # an output read by a gather before the product that writes it
    late = torch.tensor([[-1, 0, 8, 0, 0, 4, 4, 0, 0, 0], [0, 0, 8, 1, 0, 8, 8, 0, 0, 1]])
    with pytest.raises(RuntimeError, match="before the last product that writes it"):
        run(False, 4, 4, 4, [x, z], [b_op, torch.ones(8, 8)], [y, z], late, [], [], native_tables.NO_GRAMS, [], 0,
            native_linear._NO_STAGES, torch.tensor([[0, 1, 0, 8, 0]]))


def test_scatter_tables_need_groups_that_tile_the_rows_for_a_split_lead():
    """The lead product summed group by group needs every row of A_0 in one group: a plan whose
    groups leave a gap (no plan_for plan does) is refused, not summed short."""
    from types import SimpleNamespace
    gap = SimpleNamespace(groups=[SimpleNamespace(r0=0, r1=4), SimpleNamespace(r0=8, r1=12)])
    with pytest.raises(ValueError, match="tile the rows"):
        native_tables._scatter_products(gap, 2, 16, (12, 2, 2))
    short = SimpleNamespace(groups=[SimpleNamespace(r0=0, r1=4), SimpleNamespace(r0=4, r1=8)])
    with pytest.raises(ValueError, match="tile the rows"):
        native_tables._scatter_products(short, 2, 16, (12, 2, 2))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["expanding", "square", "holes", "random-T"])
@pytest.mark.parametrize("rank,bias", [(0, True), (3, True), (3, False), (0, False)])
def test_staged_backward_is_the_usual_one_bit_for_bit(name, rank, bias, threads, monkeypatch):
    """float32 dX of a plan that gathers x (a scatter table): each group's products then its grams,
    panel by panel (native_stages.backward_stages), give exactly what the usual order gives on one thread
    (every product and gram in table order, the same tiles; only when each runs changes), and the
    same to rounding on two (threads take panels from a shared counter, so their accumulators sum
    in another order in either schedule); several panels; the stages were taken."""
    monkeypatch.setattr(native_linear, "PANEL_ROWS", 5)
    monkeypatch.setattr(native_linear, "TILE_ROWS", 5)   # the staged sweep runs one tile per panel: the same tiles
    layout, b = LAYOUTS[name]
    plan = torch_kernels.plan_for(layout, b)
    assert not plan.transposed   # a transposed plan's dX is a gather table: not staged
    taken = []
    stages = native_linear._stages
    monkeypatch.setattr(native_linear, "_stages", lambda *a: taken.append(stages(*a)) or taken[-1])
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (3, 23):
            ops = _operands(layout, b, rows, rank, bias)
            _, z = native_linear.native_forward(*ops, plan, layout.shape[0] * b)
            gy = torch.linspace(-1, 1, rows * layout.shape[0] * b, dtype=F32).reshape(rows, -1)
            needs = tuple(t is not None for t in ops)
            got = []
            for staged in (True, False):
                monkeypatch.setattr(native_linear, "STAGED", staged)
                got.append(native_linear.native_backward(gy, ops[0], ops[1], ops[3], ops[4], z, plan, needs, bias))
            for a, c in zip(*got):   # threads take panels from a shared counter: sums in another order
                assert (a is None) == (c is None)
                if a is not None and threads == 1:
                    assert torch.equal(a, c)
                elif a is not None:
                    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5 * (c.abs().max().item() + 1))
    finally:
        torch.set_num_threads(previous)
    assert taken and all(len(t) == len(plan.groups) + 2 for t in taken)


class _Clock:
    """A perf_counter whose runs take what the test says: ``cost[staged]`` seconds each."""

    def __init__(self, cost: dict):
        self.now, self.cost, self.runs = 0.0, cost, []

    def perf_counter(self) -> float:
        return self.now

    def run(self, stages: torch.Tensor, rows: int | None = None) -> None:
        self.runs.append(len(stages) > 0)
        self.rows = rows
        self.now += self.cost[len(stages) > 0]


@pytest.mark.parametrize("staged_faster", [True, False])
def test_staging_is_measured_once_per_plan_config_rows_bucket_and_threads(staged_faster, monkeypatch):
    """staging_pays runs the backward both ways three rounds (order alternating) on at most
    MEASURE_MAX_ROWS rows, picks the faster, and asks no more for the same plan, config, rows bucket
    (100 and 128 rows: one bucket) and threads; another bucket, config or thread count is measured
    anew; below MEASURE_MIN_ROWS rows and under deterministic algorithms nothing is measured."""
    from pixelfly_lab.ops import native_stages
    clock = _Clock({True: 1.0 if staged_faster else 2.0, False: 1.5})
    monkeypatch.setattr(native_stages, "time", clock)
    monkeypatch.setattr(native_stages, "_PAYS", {})
    plan = torch_kernels.plan_for(*LAYOUTS["expanding"])
    stages = torch.zeros(3, 4, dtype=torch.long)
    pays = native_stages.staging_pays
    assert pays(plan, 100, clock.run, stages) is staged_faster and clock.rows == 100
    assert clock.runs == [True, False, False, True, True, False]
    assert pays(plan, 128, clock.run, stages) is staged_faster and len(clock.runs) == 6
    pays(plan, 10 ** 5, clock.run, stages)                          # another bucket, on MEASURE_MAX_ROWS rows
    assert len(clock.runs) == 12 and clock.rows == native_stages.MEASURE_MAX_ROWS
    pays(plan, 100, clock.run, stages, (3, (True,) * 5, True))      # another config
    assert len(clock.runs) == 18
    previous = torch.get_num_threads()
    torch.set_num_threads(previous + 1)
    try:
        pays(plan, 100, clock.run, stages)                          # other threads
    finally:
        torch.set_num_threads(previous)
    assert len(clock.runs) == 24
    assert pays(plan, native_stages.MEASURE_MIN_ROWS - 1, clock.run, stages) is True
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert pays(plan, 3000, clock.run, stages) is True
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert len(clock.runs) == 24


@pytest.mark.parametrize("name,need_x", [("contracting", True), ("holes-T", True), ("expanding", False)])
def test_backwards_that_cannot_stage_are_not_measured(name, need_x, monkeypatch):
    """A transposed plan's dX (a gather table), and a backward without dX, never stage: nothing
    measured for them (a plan that gathers x with dX is: the control); an unknown STAGED is refused
    by name."""
    asked = []
    monkeypatch.setattr(native_linear, "staging_pays", lambda *a: asked.append(a) or True)
    layout, b = LAYOUTS[name]
    plan = torch_kernels.plan_for(layout, b)
    ops = _operands(layout, b, 70, 3, True)
    _, z = native_linear.native_forward(*ops, plan, layout.shape[0] * b)
    gy = torch.ones(70, layout.shape[0] * b)
    needs = (need_x, True, True, True, True)
    native_linear.native_backward(gy, ops[0], ops[1], ops[3], ops[4], z, plan, needs, True)
    assert asked == []
    (layout, b), out = LAYOUTS["expanding"], LAYOUTS["expanding"][0].shape[0] * LAYOUTS["expanding"][1]
    control, c_ops = torch_kernels.plan_for(layout, b), _operands(layout, b, 70, 3, True)
    _, c_z = native_linear.native_forward(*c_ops, control, out)
    native_linear.native_backward(torch.ones(70, out), c_ops[0], c_ops[1], c_ops[3], c_ops[4], c_z, control,
                                  (True,) * 5, True)
    assert len(asked) == 1
    monkeypatch.setattr(native_linear, "STAGED", "sometimes")
    with pytest.raises(ValueError, match="STAGED"):
        native_linear.native_backward(gy, ops[0], ops[1], ops[3], ops[4], z, plan, needs, True)


@pytest.mark.parametrize("staged_faster", [True, False])
def test_measured_staging_leaves_the_backward_right(staged_faster, monkeypatch):
    """STAGED 'measured' (the default): the backward that measures runs its sweep both ways on its own
    outputs, and what it returns is what the chosen order gives alone, bit for bit (one thread);
    the choice is the one the clock made."""
    from pixelfly_lab.ops import native_stages
    monkeypatch.setattr(native_linear, "PANEL_ROWS", 5)
    monkeypatch.setattr(native_linear, "TILE_ROWS", 5)
    layout, b = LAYOUTS["expanding"]
    plan = torch_kernels.plan_for(layout, b)
    rows = 70   # measured: at least MEASURE_MIN_ROWS
    ops = _operands(layout, b, rows, 3, True)
    _, z = native_linear.native_forward(*ops, plan, layout.shape[0] * b)
    gy = torch.linspace(-1, 1, rows * layout.shape[0] * b, dtype=F32).reshape(rows, -1)
    needs = tuple(t is not None for t in ops)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setattr(native_linear, "STAGED", staged_faster)
        alone = native_linear.native_backward(gy, ops[0], ops[1], ops[3], ops[4], z, plan, needs, True)
        clock = _Clock({True: 1.0 if staged_faster else 2.0, False: 1.5})
        sweep = native_linear._sweep

        def timed(*args):   # the real sweep, its time set by the clock (args[10]: the stages)
            sweep(*args)
            clock.run(args[10])
        monkeypatch.setattr(native_linear, "_sweep", timed)
        monkeypatch.setattr(native_stages, "time", clock)
        monkeypatch.setattr(native_stages, "_PAYS", {})
        monkeypatch.setattr(native_linear, "STAGED", "measured")
        measured = native_linear.native_backward(gy, ops[0], ops[1], ops[3], ops[4], z, plan, needs, True)
    finally:
        torch.set_num_threads(previous)
    assert list(native_stages._PAYS.values()) == [staged_faster]
    assert clock.runs == [True, False, False, True, True, False, staged_faster]
    for a, c in zip(alone, measured):
        assert (a is None) == (c is None) and (a is None or torch.equal(a, c))


def test_stages_follow_the_groups_or_are_left_out():
    """native_stages.backward_stages: one stage per group between what runs before and after,
    consecutive ranges covering both tables, each group's products reading its rows of gy and its
    grams writing its accumulator; a table whose groups are out of order gets no stages (the usual
    order). The sweep refuses stages that skip a row, are out of order, or have several tiles per
    panel, and a gram reading an output of the products in a stage before their last writer."""
    layout, b = LAYOUTS["random-T"]
    plan = torch_kernels.plan_for(layout, b)
    assert not plan.transposed
    n, out, into = len(plan.groups), layout.shape[0] * b, layout.shape[1] * b
    table = native_linear.product_tables(plan, "scatter", 4, into, (out, n + 1, 3))
    grams = native_tables.gram_table(plan, True, 4, ((0, into, 3),), (1, n))
    stages = native_linear._stages(plan, "scatter", table, grams)
    assert stages.shape == (n + 2, 4)
    assert stages[0, 0] == 0 and stages[0, 2] == 0 and stages[-1, 1] == len(table) and stages[-1, 3] == len(grams)
    assert torch.equal(stages[1:, 0], stages[:-1, 1]) and torch.equal(stages[1:, 2], stages[:-1, 3])
    for i, g in enumerate(plan.groups):
        p0, p1, g0, g1 = stages[i + 1].tolist()
        assert p1 > p0 and bool((table[p0:p1, 1] == g.r0).all()) and bool((table[p0:p1, 0] == 0).all())
        assert g1 > g0 and bool((grams[g0:g1, 6] == i).all())
    assert bool((table[stages[-1, 0]:, 0] == 1).all())   # last: the low-rank product, reading gz
    swapped = torch.cat([table[stages[2, 0]:stages[2, 1]], table[stages[1, 0]:stages[1, 1]], table[stages[3, 0]:]])
    assert len(native_linear._stages(plan, "scatter", swapped, grams)) == 0
    # the sweep's own checks, on a table without the low-rank term: x and gy, one accumulator per group
    table = native_linear.product_tables(plan, "scatter", 0, into)
    grams = native_tables.gram_table(plan, True, 0, (), (1, n))
    stages = native_linear._stages(plan, "scatter", table, grams)
    x, gy = torch.ones(4, into), torch.ones(4, out)
    accs = [torch.empty(g.width, g.r1 - g.r0) for g in plan.groups]
    values = torch.ones(int(layout.sum()), b, b)
    b_ops = native_linear._packed(values, plan, plan.transposed, values.dtype)
    module = native.load("blocksparse_cpu")

    def run(*args):
        return module.sweep(*args, native_tables.NO_GATHERS)

    args = ([gy], b_ops, [torch.empty(4, into)], table, [x], [gy], grams, accs, native_linear.STREAM_BYTES)
    run(False, 4, 4, 4, *args, stages)   # the stages as found: accepted
    skipped = torch.tensor([[0, len(table) - 1, 0, len(grams)]])   # in order, but the last product left out
    with pytest.raises(RuntimeError, match="cover"):
        run(False, 4, 4, 4, *args, skipped)
    swapped = torch.tensor([[0, len(table), len(grams), len(grams)], [len(table), len(table), 0, len(grams)]])
    with pytest.raises(RuntimeError, match="consecutive"):   # the grams' range before the first's end
        run(False, 4, 4, 4, *args, swapped)
    with pytest.raises(RuntimeError, match="one tile per panel"):
        run(False, 4, 2, 4, *args, stages)
    # a gram reading gz (an output of the products, here faked as x's alias) in a stage before its writer
    gz = torch.ones(4, 3)
    lead = torch.tensor([[0, 0, 4, 0, 0, 3, 3, 0, 0, 1]])   # gz (output 1) = gy[:, :4] @ B_0[:4, :3]
    dv = torch.tensor([[1, 0, 3, 0, 0, into, 0, 0, 0]])     # acc_0 (3 x into) += gz^T x
    early = torch.tensor([[0, 0, 0, 1], [0, 1, 1, 1]])       # the gram in stage 0, its writer in stage 1
    acc = [torch.empty(3, into)]
    with pytest.raises(RuntimeError, match="before the stage"):
        run(False, 4, 4, 4, [gy], [torch.ones(4, 3)], [torch.empty(4, into), gz], lead, [x, gz], [x], dv, acc,
            native_linear.STREAM_BYTES, early)
    late = torch.tensor([[0, 1, 0, 0], [1, 1, 0, 1]])
    run(False, 4, 4, 4, [gy], [torch.ones(4, 3)], [torch.empty(4, into), gz], lead, [x, gz], [x], dv, acc,
        native_linear.STREAM_BYTES, late)
    torch.testing.assert_close(acc[0], (gy[:, :4] @ torch.ones(4, 3)).T @ x)


def test_native_applies_to_float32_x_with_bfloat16_values_only():
    """The one mixed pair the sweep takes is float32 x with bfloat16 values (autocast's); float32
    x with float16 values, or 16-bit x with float32 values, go elsewhere."""
    x, values = torch.randn(8, 16), torch.randn(2, 4, 4)
    assert native_linear.native_applies(x, values)
    assert not native_linear.native_applies(x, values.half())
    assert not native_linear.native_applies(x.bfloat16(), values)
    assert native_linear.native_applies(x, values.bfloat16()) == native_linear.native_takes(torch.bfloat16, "cpu", 4)


@pytest.mark.parametrize("block", [3, 4])
def test_autocast_gives_x_a_float32_gradient_on_every_route(block, monkeypatch):
    """Under bfloat16 autocast x.grad is float32 whether the sweep takes float32 x (even blocks on
    AMX or AVX512-BF16) or x is cast first (odd blocks, the PyTorch path; or PIXELFLY_NATIVE=0): the op hands dX back
    in x's dtype on every route, and the forward sees x uncast exactly where the sweep runs."""
    torch.manual_seed(0)
    layer = PixelflyLinear(48, 96, budget=0.5, block_size=block, backend="torch") if block == 3 else \
        PixelflyLinear(64, 128, budget=0.5, block_size=block, backend="torch")
    monkeypatch.setattr(torch_kernels, "dense_gemm_wins", lambda *a: False)
    seen = []
    real = torch_kernels._grouped_forward
    monkeypatch.setattr(torch_kernels, "_grouped_forward", lambda x2, *a: seen.append(x2.dtype) or real(x2, *a))
    x = torch.randn(40, layer.in_features, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    sweep = native_linear.native_takes(torch.bfloat16, "cpu", block)
    assert seen == [torch.float32 if sweep else torch.bfloat16]


@needs_bf16
def test_bfloat16_takes_even_blocks_only_and_fp16_never(monkeypatch):
    """bfloat16 micro-kernels read K in pairs: an odd block size keeps the PyTorch path (it corrupted
    the heap before this gate), and the C++ side refuses a table with odd K; float16 never takes the sweep."""
    x = torch.zeros(4, 12, dtype=torch.bfloat16)
    assert native_linear.native_applies(x, torch.zeros(2, 4, 4, dtype=torch.bfloat16))
    assert not native_linear.native_applies(x, torch.zeros(2, 3, 3, dtype=torch.bfloat16))
    assert not native_linear.native_applies(x.half(), torch.zeros(2, 4, 4, dtype=torch.float16))
    layout = torch.ones(2, 3, dtype=torch.bool)   # K = 3 blocks of 3 = 9
    ops = _operands(layout, 3, 5, 0, False)
    plan = torch_kernels.plan_for(layout, 3)
    with pytest.raises(RuntimeError, match="even"):
        native_linear.native_forward(ops[0].bfloat16(), ops[1].bfloat16(), None, None, None, plan, 6)
    torch.manual_seed(0)
    for block in (3, 4):   # the layer under autocast, both block sizes: the reference's values
        layer = PixelflyLinear(8 * block, 16 * block, budget=0.5, block_size=block, backend="torch")
        x = torch.randn(33, 8 * block)
        with torch.autocast("cpu", torch.bfloat16):
            y = layer(x)
        with torch.no_grad():
            want = torch.nn.functional.linear(x.double(), layer.dense_weight().double(), layer.bias.double())
        torch.testing.assert_close(y.double(), want, rtol=0, atol=3e-2 * want.abs().max().item())


def test_a_kernel_that_cannot_be_built_warns_and_gives_none(monkeypatch, tmp_path):
    """No setuptools / compiler / ninja: a RuntimeWarning naming the kernel, None (the PyTorch paths run)."""
    import builtins

    real_import = builtins.__import__

    def no_cpp_extension(name, *args, **kwargs):
        if name.startswith("torch.utils.cpp_extension"):
            raise ImportError("No module named 'setuptools'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(native, "_MODULES", {})
    monkeypatch.setenv("PIXELFLY_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr(builtins, "__import__", no_cpp_extension)
    with pytest.warns(RuntimeWarning, match="blocksparse_cpu.*could not be built"):
        assert native.load("blocksparse_cpu") is None
    assert native.load("blocksparse_cpu") is None   # remembered: no second attempt, no second warning
