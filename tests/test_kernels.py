"""Block-sparse matmul: every fast path against the dense reference, values and gradients."""

import importlib.util
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pixelfly_lab.ops import torch_sweep
from pixelfly_lab.ops.matmul import (block_sparse_matmul, blocks_to_dense, dense_to_blocks, plan_for,
                                  resolve_backend, sparse_lowrank_matmul)
from pixelfly_lab.structure.masks import flat_block_butterfly_layout, layout_to_mask

F64 = torch.float64


def _operands(layout, b, *, rank=0, bias=True, batch=(5,), seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    R, C = layout.shape

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()
    x = rand(*batch, C * b)
    values = rand(int(layout.sum()), b, b)
    return (x, values, rand(R * b) if bias else None,
            rand(R * b, rank) if rank else None, rand(C * b, rank) if rank else None)


def _value_and_grads(backend, layout, x, values, bias, u, v):
    y = sparse_lowrank_matmul(x, values, layout, u, v, bias, backend=backend)
    probe = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)  # not all-ones: catches mixups
    inputs = [t for t in (x, values, bias, u, v) if t is not None]
    return y, torch.autograd.grad(y, inputs, probe)


def _assert_matches_reference(layout, b, **kw):
    ops = _operands(layout, b, **kw)
    y_ref, g_ref = _value_and_grads("reference", layout, *ops)
    y, g = _value_and_grads("torch", layout, *ops)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


LAYOUTS = {
    "butterfly_expanding": (flat_block_butterfly_layout(256, 64, 8, 2, 4), 4),   # gather plan
    "butterfly_contracting": (flat_block_butterfly_layout(64, 256, 8, 2, 4), 4),  # scatter plan
    "shuffle_global": (flat_block_butterfly_layout(64, 64, 8, 2, 4, shuffle=True, global_size=4), 4),
    "empty_rows_and_cols": (torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool), 3),
    "blockdiag": (torch.block_diag(*[torch.ones(2, 3)] * 2).bool(), 2),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("rank", [0, 3])
def test_torch_path_matches_reference(name, rank):
    layout, b = LAYOUTS[name]
    _assert_matches_reference(layout, b, rank=rank)
    _assert_matches_reference(layout, b, rank=rank, bias=False, batch=(2, 3))


def test_plan_orientation_takes_the_narrow_side():
    assert not plan_for(flat_block_butterfly_layout(4096, 1024, 16, 2, 32), 32).transposed
    assert plan_for(flat_block_butterfly_layout(1024, 4096, 16, 2, 32), 32).transposed
    # rows with the same column set form one GEMM: a flat butterfly has butterfly_size of them
    plan = plan_for(flat_block_butterfly_layout(4096, 1024, 16, 2, 32), 32)
    assert len(plan.groups) == 16 and not plan.covers_once
    # a block-diagonal layout: one GEMM per diagonal block, each column read by exactly one
    plan = plan_for(flat_block_butterfly_layout(4096, 1024, 16, 1, 32), 32)
    assert len(plan.groups) == 8 and plan.covers_once and all(len(g.runs) == 1 for g in plan.groups)


SMALL = {  # gradcheck differentiates numerically entry by entry: keep the operands tiny
    "expanding": flat_block_butterfly_layout(16, 8, 4, 1, 2),
    "contracting": flat_block_butterfly_layout(8, 16, 4, 1, 2),
    "irregular": LAYOUTS["empty_rows_and_cols"][0],
}


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("name", list(SMALL))
def test_gradcheck(backend, name):
    layout = SMALL[name]
    x, values, bias, u, v = _operands(layout, 2, rank=2, batch=(3,))

    def f(x, values, bias, u, v):
        return sparse_lowrank_matmul(x, values, layout, u, v, bias, backend=backend)
    assert torch.autograd.gradcheck(f, (x, values, bias, u, v))


@settings(max_examples=20, deadline=None)
@given(R=st.integers(1, 5), C=st.integers(1, 5), b=st.integers(1, 3), rank=st.integers(0, 2),
       seed=st.integers(0, 2**16), density=st.floats(0.0, 1.0))
def test_any_layout_matches_reference(R, C, b, rank, seed, density):
    layout = torch.rand(R, C, generator=torch.Generator().manual_seed(seed)) < density
    _assert_matches_reference(layout, b, rank=rank, seed=seed)


def test_blocks_round_trip_in_row_major_layout_order():
    layout = torch.tensor([[0, 1], [1, 1]], dtype=torch.bool)
    w = torch.arange(16.0).reshape(4, 4)
    values = dense_to_blocks(w, layout, 2)
    for k, (i, j) in enumerate(layout.nonzero().tolist()):
        assert torch.equal(values[k], w[2 * i:2 * i + 2, 2 * j:2 * j + 2])
    assert torch.equal(blocks_to_dense(values, layout), w * layout_to_mask(layout, 2))


def test_block_sparse_matmul_is_x_times_dense_transpose_plus_bias():
    layout, b = LAYOUTS["butterfly_expanding"]
    x, values, bias, _, _ = _operands(layout, b)
    want = x @ blocks_to_dense(values, layout).T + bias
    torch.testing.assert_close(block_sparse_matmul(x, values, layout, bias), want)


def test_float32_close_to_float64():
    layout, b = LAYOUTS["butterfly_contracting"]
    x, values, bias, u, v = _operands(layout, b, rank=2)
    y64 = sparse_lowrank_matmul(x, values, layout, u, v, bias)
    y32 = sparse_lowrank_matmul(*(t.float() for t in (x, values)), layout, u.float(), v.float(), bias.float())
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


def test_auto_uses_the_reference_under_torch_func():
    layout = SMALL["expanding"]
    x, values, bias, _, _ = _operands(layout, 2, batch=(4,))
    jac = torch.func.jacrev(lambda val: block_sparse_matmul(x, val, layout, bias))(values)
    dense_jac = torch.func.jacrev(lambda val: x @ blocks_to_dense(val, layout).T)(values)
    torch.testing.assert_close(jac, dense_jac)
    ys = torch.func.vmap(lambda row: block_sparse_matmul(row, values, layout, bias))(x)
    torch.testing.assert_close(ys, block_sparse_matmul(x, values, layout, bias))


def test_backend_resolution_on_cpu(monkeypatch):
    # test_triton.py turns the interpreter on for its whole process; this test is about plain CPU
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(2, 4)
    assert resolve_backend(x, "auto") == "torch"
    assert resolve_backend(x, "auto", 2, out_features=8) == "reference"          # tiny: one dense GEMM
    assert resolve_backend(torch.zeros(1).expand(4096, 1024), "auto", 32, 4096) == "torch"
    # one row of a large layer: the reference would materialise its 4M-entry weight on every call
    assert resolve_backend(torch.zeros(1, 1024), "auto", 32, 4096) == "torch"
    assert resolve_backend(x, "reference") == "reference"
    with pytest.raises(ValueError, match="CUDA"):
        resolve_backend(x, "triton")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend(x, "fast")


def test_bad_operands_are_refused_by_name():
    layout, b = LAYOUTS["blockdiag"]
    x, values, bias, _, _ = _operands(layout, b)
    with pytest.raises(ValueError, match="in_features=12"):
        block_sparse_matmul(x[:, :5], values, layout)
    with pytest.raises(ValueError, match="nonzero blocks"):
        block_sparse_matmul(x, values[1:], layout)
    with pytest.raises(ValueError, match="bias"):
        block_sparse_matmul(x, values, layout, bias[1:])
    with pytest.raises(TypeError, match="dtype"):
        block_sparse_matmul(x.float(), values, layout)
    with pytest.raises(ValueError, match="both u and v"):
        sparse_lowrank_matmul(x, values, layout, torch.zeros(4, 1, dtype=F64), None)


def test_importing_the_package_does_not_import_triton():
    code = ("import sys, pixelfly_lab.ops.matmul, pixelfly_lab.nn.layers, pixelfly_lab.nn.butterfly; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_autocast_computes_in_the_autocast_dtype():
    layout, b = LAYOUTS["butterfly_expanding"]
    x, values, bias, u, v = (t.detach().float() for t in _operands(layout, b, rank=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_lowrank_matmul(x, values, layout, u, v, bias, backend="torch")
    assert y.dtype == torch.bfloat16
    want = sparse_lowrank_matmul(x, values, layout, u, v, bias, backend="reference")
    torch.testing.assert_close(y.float(), want, rtol=0.05, atol=0.1)


TRITON_DISPATCH = """
import os; os.environ['TRITON_INTERPRET'] = '1'
import torch
from pixelfly_lab.nn.layers import PixelflyLinear
torch.manual_seed(0)
layer = PixelflyLinear(32, 64, butterfly_size=4, n_factors=1, rank=2, block_size=16)
x = torch.randn(4, 32, requires_grad=True)
out = {}
for backend in ('triton', 'reference'):
    layer.backend = backend
    y = layer(x)
    out[backend] = (y, torch.autograd.grad(y.square().sum(), [x, *layer.parameters()]))
torch.testing.assert_close(out['triton'][0], out['reference'][0], rtol=1e-4, atol=1e-4)
for got, want in zip(out['triton'][1], out['reference'][1]):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_backend_dispatch_under_the_interpreter():
    # a subprocess: TRITON_INTERPRET must be set before triton is first imported
    subprocess.run([sys.executable, "-c", TRITON_DISPATCH], check=True)


@pytest.mark.parametrize("name", ["butterfly_expanding", "butterfly_contracting", "empty_rows_and_cols", "blockdiag"])
def test_row_chunked_sweeps_match_reference(name, monkeypatch):
    monkeypatch.setattr(torch_sweep, "CHUNK_ROWS", 2)  # 7 rows: three full chunks and a partial one
    layout, b = LAYOUTS[name]
    _assert_matches_reference(layout, b, rank=2, batch=(7,))
    _assert_matches_reference(layout, b, rank=0, batch=(7,))


@pytest.mark.parametrize("name", ["butterfly_expanding", "butterfly_contracting"])
@pytest.mark.parametrize("wanted", ["x", "values", "bias", "u", "v"])
def test_each_gradient_alone(name, wanted):
    layout, b = LAYOUTS[name]
    ops = dict(zip(["x", "values", "bias", "u", "v"], (t.detach() for t in _operands(layout, b, rank=2))))
    ops[wanted].requires_grad_()
    grads = []
    for backend in ("torch", "reference"):
        y = sparse_lowrank_matmul(ops["x"], ops["values"], layout, ops["u"], ops["v"], ops["bias"], backend=backend)
        grads.append(torch.autograd.grad(y, ops[wanted], torch.cos(y))[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)
