"""The 'torch' backend's plain functions and fast paths against the dense reference (float64)."""

import pytest
import torch

from pixelfly_lab.ops import torch_buffers, torch_grouped, torch_kernels, torch_plan, torch_sweep
from pixelfly_lab.ops.matmul import blocks_to_dense
from pixelfly_lab.structure.masks import flat_block_butterfly_layout

F64 = torch.float64

LAYOUTS = {
    "expanding": (flat_block_butterfly_layout(256, 64, 8, 2, 4), 4),     # gather plan
    "contracting": (flat_block_butterfly_layout(64, 256, 8, 2, 4), 4),   # scatter plan
    "square": (flat_block_butterfly_layout(128, 128, 8, 2, 8), 8),
}


def _operands(layout, b, rank, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    R, C = layout.shape

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)
    return (rand(7, C * b), rand(int(layout.sum()), b, b), rand(R * b) if bias else None,
            rand(R * b, rank) if rank else None, rand(C * b, rank) if rank else None)


def _reference_grads(layout, gy, x, values, bias, u, v):
    leaves = [t if t is None else t.clone().requires_grad_() for t in (x, values, bias, u, v)]
    x_, values_, bias_, u_, v_ = leaves
    w = blocks_to_dense(values_, layout) + (u_ @ v_.T if u_ is not None else 0)
    y = torch.nn.functional.linear(x_, w, bias_)
    used = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, used, gy))
    return y.detach(), [None if t is None else next(grads) for t in leaves]


@pytest.mark.parametrize("fill", [None, torch_kernels.PAD_FILL, 0.3])
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("rank,bias", [(0, True), (3, True), (3, False), (0, False)])
def test_plain_forward_and_backward_match_reference(name, rank, bias, fill):
    """Grouped and padded plans (zero blocks where a row stores none) give the reference's values
    and gradients."""
    layout, b = LAYOUTS[name]
    x, values, bias_t, u, v = _operands(layout, b, rank, bias)
    plan = torch_kernels.plan_for(layout, b, fill=fill)
    if fill is not None:
        assert any(g.zero_at is not None for g in plan.groups)   # the test covers padded groups
    y, z = torch_kernels.sparse_lowrank_forward(x, values, bias_t, u, v, plan, layout.shape[0] * b)
    gy = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)   # not all-ones: catches mixups
    y_ref, g_ref = _reference_grads(layout, gy, x, values, bias_t, u, v)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    needs = tuple(t is not None for t in (x, values, bias_t, u, v))
    grads = torch_kernels.sparse_lowrank_backward(gy, x, values, u, v, z, plan, needs, bias)
    for got, want in zip(grads, g_ref):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


RANDOM = torch.rand(16, 8, generator=torch.Generator().manual_seed(4)) < 0.45   # groups of 2-5 column runs
HOLES = torch.tensor([[True, False, False, True], [False, False, False, False], [True, True, False, True]])   # an empty row and column


@pytest.mark.parametrize("max_split", [0, 2, 100])
@pytest.mark.parametrize("layout,b", [*LAYOUTS.values(), (RANDOM, 4), (RANDOM.T.contiguous(), 4), (HOLES, 4),
                                      (HOLES.T.contiguous(), 4)])
@pytest.mark.parametrize("rank,bias", [(0, True), (3, True), (3, False), (0, False)])
def test_split_and_gathered_products_match_reference(layout, b, rank, bias, max_split, monkeypatch):
    """Runs read as views (one GEMM each), products written straight into their pieces, and the
    gathered fallback (groups with more runs or pieces than MAX_SPLIT) all give the reference."""
    monkeypatch.setattr(torch_grouped, "MAX_SPLIT", max_split)
    plan = torch_kernels.plan_for(layout, b)
    if max_split == 2 and layout.shape == RANDOM.shape:   # both routes within one plan
        assert {len(g.runs) > 2 for g in plan.groups} == {True, False}
    x, values, bias_t, u, v = _operands(layout, b, rank, bias)
    y, z = torch_kernels.sparse_lowrank_forward(x, values, bias_t, u, v, plan, layout.shape[0] * b)
    gy = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)
    y_ref, g_ref = _reference_grads(layout, gy, x, values, bias_t, u, v)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    needs = tuple(t is not None for t in (x, values, bias_t, u, v))
    grads = torch_kernels.sparse_lowrank_backward(gy, x, values, u, v, z, plan, needs, bias)
    for got, want in zip(grads, g_ref):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_stacked_plans_pack_and_unpack_as_each_group_does(name):
    """A flat block butterfly's groups all have one shape: one gather packs them, one copy unpacks
    their gradients, equal to the per-group packing and unpacking."""
    layout, b = LAYOUTS[name]
    plan = torch_kernels.plan_for(layout, b)
    assert plan.stacked_index is not None
    assert torch_kernels.plan_for(RANDOM, 4).stacked_index is None
    values = torch.randn(int(layout.sum()), b, b, dtype=F64)
    for transpose in (False, True):
        for got, g in zip(plan.packed_all(values, transpose), plan.groups):
            torch.testing.assert_close(got, plan.packed(values, g, transpose), rtol=0, atol=0)
    grad_mt = torch.randn(len(plan.groups), plan.groups[0].width + 2, plan.groups[0].r1 - plan.groups[0].r0, dtype=F64)
    stacked, each = torch.full_like(values, float("nan")), torch.full_like(values, float("nan"))
    plan.store_grads(stacked, grad_mt)
    for g, one in zip(plan.groups, grad_mt):
        plan.store_grad(each, one.T[:, :g.width], g)
    torch.testing.assert_close(stacked, each, rtol=0, atol=0)   # every block written (no NaN left)


@pytest.mark.parametrize("needs", [(False, True, False, False, False), (True, False, False, False, False),
                                   (False, False, False, False, True), (True, False, True, True, False)])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_backward_computes_only_what_is_asked(name, needs):
    """Any subset of gradients, in both orientations (gather and scatter plans), equals the
    reference's and the others are None."""
    layout, b = LAYOUTS[name]
    x, values, bias, u, v = _operands(layout, b, 2, True)
    plan = torch_kernels.plan_for(layout, b)
    y, z = torch_kernels.sparse_lowrank_forward(x, values, bias, u, v, plan, layout.shape[0] * b)
    gy = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape)
    _, g_ref = _reference_grads(layout, gy, x, values, bias, u, v)
    grads = torch_kernels.sparse_lowrank_backward(gy, x, values, u, v, z, plan, needs, True)
    for got, want, need in zip(grads, g_ref, needs):
        assert (got is None) == (not need)
        if need:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_layouts_cover_both_plan_orientations():
    assert {torch_kernels.plan_for(layout, b).transposed for layout, b in LAYOUTS.values()} == {False, True}


def test_pooled_outputs_are_reused_only_when_nothing_references_them(monkeypatch):
    monkeypatch.setattr(torch_buffers, "POOL_MIN_BYTES", 1)
    torch_buffers.release_buffers()
    like = torch.zeros(1)
    first = torch_buffers.new_output((4, 5), like)
    view = first[1:]
    del first
    second = torch_buffers.new_output((4, 5), like)     # the first is still referenced by a view
    assert second.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()
    ptr = view.untyped_storage().data_ptr()
    del view
    third = torch_buffers.new_output((2, 10), like, zero=True)   # same size: the freed buffer
    assert third.untyped_storage().data_ptr() == ptr
    assert third.shape == (2, 10) and bool((third == 0).all())
    assert torch_buffers.release_buffers() >= 2 * 20 * 4


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_outputs_kept_across_calls_stay_intact_with_pooling(name, monkeypatch):
    monkeypatch.setattr(torch_buffers, "POOL_MIN_BYTES", 1)
    layout, b = LAYOUTS[name]
    plan = torch_kernels.plan_for(layout, b)
    first = _operands(layout, b, 2, True, seed=1)
    second = _operands(layout, b, 2, True, seed=2)
    y1, _ = torch_kernels.sparse_lowrank_forward(*first, plan, layout.shape[0] * b)
    kept = y1.clone()
    y2, _ = torch_kernels.sparse_lowrank_forward(*second, plan, layout.shape[0] * b)
    assert y1.untyped_storage().data_ptr() != y2.untyped_storage().data_ptr()
    torch.testing.assert_close(y1, kept, rtol=0, atol=0)
    torch.testing.assert_close(y2, _reference_grads(layout, torch.zeros_like(y2), *second)[0])
    torch_buffers.release_buffers()


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("rank,bias", [(0, True), (3, False)])
def test_dense_route_matches_reference(name, rank, bias, monkeypatch):
    monkeypatch.setattr(torch_kernels, "dense_gemm_wins", lambda *args: True)
    test_plain_forward_and_backward_match_reference(name, rank, bias, torch_kernels.PAD_FILL)


def test_route_is_measured_once_per_shape_and_only_in_its_size_band(monkeypatch):
    calls = []

    def measure(plan, rows, *args):
        calls.append(rows)
        return True
    monkeypatch.setattr(torch_kernels, "_measure_routes", measure)
    monkeypatch.setattr(torch_kernels, "_ROUTES", {})
    monkeypatch.setattr(torch_kernels, "ROUTE_MIN_MACS", 100 * 128 * 128)
    layout, b = LAYOUTS["square"]
    plan, like = torch_kernels.plan_for(layout, b), torch.zeros(1)
    assert not torch_kernels.dense_gemm_wins(plan, 8, 128, 128, 0, like)            # below ROUTE_MIN_MACS
    assert calls == []
    rows = torch_kernels.ROUTE_MIN_MACS // (128 * 128) + 1
    assert torch_kernels.dense_gemm_wins(plan, rows, 128, 128, 0, like)
    assert torch_kernels.dense_gemm_wins(plan, rows + 1, 128, 128, 0, like)         # same bucket: cached
    assert calls == [128]                                                           # 101 rows: bucket 128
    assert not torch_kernels.dense_gemm_wins(plan, rows, 128, 128, 0, like.to(torch.device("meta")))
    monkeypatch.setattr(torch_kernels, "ROUTE_MAX_WEIGHT", 128 * 128)
    assert not torch_kernels.dense_gemm_wins(plan, 4 * rows, 128, 128, 0, like)     # large weights: grouped
    monkeypatch.setattr(torch_kernels, "ROUTE_MAX_MACS_16BIT", 4 * rows * 128 * 128)
    half = like.to(torch.bfloat16)
    assert torch_kernels.dense_gemm_wins(plan, 4 * rows, 128, 128, 0, half)   # 16-bit, few MACs: measured
    assert not torch_kernels.dense_gemm_wins(plan, 8 * rows, 128, 128, 0, half)  # 16-bit, more MACs: grouped
    assert calls == [128, 512]                                                      # 404 rows: bucket 512


@pytest.mark.parametrize("dtype,params", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                          (torch.bfloat16, torch.bfloat16)])
def test_route_measurement_runs_both_routes(dtype, params):
    """Both routes timed as the call runs them, also float32 parameters of a bfloat16 product."""
    layout, b = LAYOUTS["expanding"]
    plan = torch_kernels.plan_for(layout, b)
    assert torch_kernels._measure_routes(plan, 64, 64, 256, 2, dtype, params) in (True, False)


def test_route_measurement_is_hidden_from_dispatch_modes(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(torch_kernels, "_ROUTES", {})
    layout, b = LAYOUTS["expanding"]
    plan = torch_kernels.plan_for(layout, b)
    with FlopCounterMode(display=False) as counter:
        torch_kernels._measure_routes(plan, 64, 64, 256, 2, torch.float32, torch.float32)
    assert counter.get_total_flops() == 0


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("dense_route", [False, True])
def test_gradients_share_no_storage(name, dense_route, monkeypatch):
    """Custom-op outputs may not alias: checked by storage, which holds under dispatch modes too."""
    monkeypatch.setattr(torch_kernels, "dense_gemm_wins", lambda *args: dense_route)
    layout, b = LAYOUTS[name]
    ops = _operands(layout, b, 3, True)
    plan = torch_kernels.plan_for(layout, b)
    y, z = torch_kernels.sparse_lowrank_forward(*ops, plan, layout.shape[0] * b)
    grads = torch_kernels.sparse_lowrank_backward(torch.randn_like(y), ops[0], ops[1], ops[3], ops[4], z, plan,
                                                  (True,) * 5, True)
    storages = [t.untyped_storage().data_ptr() for t in (*grads, *[o for o in ops if o is not None], y)]
    assert len(set(storages)) == len(storages)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("rank,bias", [(0, True), (3, True), (3, False)])
def test_sweeps_shared_among_worker_threads_match_reference(name, rank, bias, threads, monkeypatch):
    monkeypatch.setattr(torch_sweep, "CHUNK_ROWS", 2)            # 7 rows: several chunks per worker
    monkeypatch.setattr(torch_sweep, "MIN_ROWS_PER_WORKER", 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch_sweep.sweep_workers(7, torch.zeros(1)) == threads
        assert torch_sweep.sweep_workers(7, torch.zeros(1, device="meta")) == 1
        test_plain_forward_and_backward_match_reference(name, rank, bias, None)
        assert torch.get_num_threads() == threads                      # restored after each product
        layout, b = LAYOUTS[name]
        ops = _operands(layout, b, rank, bias)
        plan = torch_kernels.plan_for(layout, b)
        with torch.inference_mode():                                   # the caller's mode reaches the workers
            y, _ = torch_kernels.sparse_lowrank_forward(*ops, plan, layout.shape[0] * b)
        assert y.is_inference()
    finally:
        torch.set_num_threads(previous)


def test_chunks_are_equal_and_a_multiple_of_the_workers():
    sizes = [s.stop - s.start for s in torch_sweep.row_chunks(1568)]
    assert sizes == [392] * 4
    parts = torch_sweep.row_chunks(1000, 3)
    assert len(parts) % 3 == 0 and parts[0].start == 0 and parts[-1].stop == 1000
    assert all(a.stop == b.start for a, b in zip(parts, parts[1:]))


def test_grouped_products_run_torch_single_threaded_with_the_callers_workers(monkeypatch):
    monkeypatch.setattr(torch_sweep, "MIN_ROWS_PER_WORKER", 1)
    layout, b = LAYOUTS["expanding"]
    ops = _operands(layout, b, 3, True)
    plan = torch_kernels.plan_for(layout, b)
    seen = []
    sweep = torch_sweep.sweep

    def spy(n_rows, body, workers, like=None):
        seen.append((torch.get_num_threads(), workers))
        sweep(n_rows, body, workers, like)
    monkeypatch.setattr(torch_grouped, "sweep", spy)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, z = torch_kernels.sparse_lowrank_forward(*ops, plan, layout.shape[0] * b)
        torch_kernels.sparse_lowrank_backward(torch.ones_like(y), ops[0], ops[1], ops[3], ops[4], z, plan,
                                              (True,) * 5, True)
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):      # restored when the product fails, too
            torch_kernels.sparse_lowrank_forward(ops[0][:, :-1], *ops[1:], plan, layout.shape[0] * b)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert seen and all(s == (1, 2) for s in seen[:2])    # torch single-threaded, two sweep workers




@pytest.mark.parametrize("layout,b", [*LAYOUTS.values(), (HOLES, 4), (HOLES.T.contiguous(), 4)])
def test_scatter_pieces_write_each_column_first_then_add(layout, b):
    """Exact oracle: replaying the groups in order, a column's first product is written, later
    ones added; columns no group reads are the holes; the pieces tile each group's product."""
    for plan in (torch_plan._build_plan(layout, b, t, torch.device("cpu")) for t in (False, True)):
        pieces, holes = plan.scatter_pieces
        width = (layout.shape[0] if plan.transposed else layout.shape[1]) * b
        seen = torch.zeros(width, dtype=torch.int)
        for g, own in zip(plan.groups, pieces):
            assert sum(c1 - c0 for _, c0, c1, _ in own) == g.width
            for off, c0, c1, write in own:
                assert bool((seen[c0:c1] == 0).all()) == write and bool((seen[c0:c1] > 0).all()) != write
                # the piece's product columns are the gathered columns c0..c1
                gathered = [c for r0, r1 in g.runs for c in range(r0, r1)]
                assert gathered[off:off + c1 - c0] == list(range(c0, c1))
                seen[c0:c1] += 1
        hole_cols = [c for c0, c1 in holes for c in range(c0, c1)]
        assert hole_cols == (seen == 0).nonzero().flatten().tolist()


@pytest.mark.parametrize("fill", [None, torch_kernels.PAD_FILL])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("chunk", [2, None])
@pytest.mark.parametrize("layout,b", [LAYOUTS["expanding"], LAYOUTS["contracting"], (HOLES, 4)])
def test_bfloat16_sweeps_match_the_reference(layout, b, chunk, threads, fill, monkeypatch):
    """16-bit inputs sweep in their own chunks (one per worker by default): values and gradients
    as the float64 reference computed from the same bfloat16 numbers, to bfloat16 rounding."""
    if chunk:
        monkeypatch.setattr(torch_sweep, "CHUNK_ROWS_16BIT", chunk)
    monkeypatch.setattr(torch_sweep, "MIN_ROWS_PER_WORKER", 1)
    ops = [t if t is None else t.bfloat16() for t in _operands(layout, b, 3, True)]
    plan = torch_kernels.plan_for(layout, b, fill=fill)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, z = torch_kernels.sparse_lowrank_forward(*ops, plan, layout.shape[0] * b)
        gy = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape).bfloat16()
        grads = torch_kernels.sparse_lowrank_backward(gy, ops[0], ops[1], ops[3], ops[4], z, plan, (True,) * 5, True)
    finally:
        torch.set_num_threads(previous)
    y_ref, g_ref = _reference_grads(layout, gy.double(), *[t.double() for t in ops])
    for got, want in zip([y, *grads], [y_ref, *g_ref]):
        assert got.dtype == torch.bfloat16
        scale = want.abs().max().clamp_min(1e-3)
        assert ((got.double() - want).abs().max() / scale) < 3e-2
