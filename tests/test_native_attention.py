"""The compiled CPU attention kernel (pixelfly_lab.ops.native_attention) against the float64 dense reference:
out, lse, and dq, dk, dv with and without a gradient on lse; causal and not; rows of one block to whole
rows; head widths 64, 32 and odd ones (vector tails); NaN kept to its batch element; threads; bad input.

Skipped where the kernel cannot be built, except under CI=true (the CI machine has g++ and ninja)."""

import os

import pytest
import torch

from pixelfly_lab.ops import native
from pixelfly_lab.ops.attention import attention_plan, block_attention_reference, block_sparse_attention
from pixelfly_lab.ops.native_attention import native_applies, native_attention_backward, native_attention_forward
from pixelfly_lab.ops.registry import register_layout
from pixelfly_lab.ops.torch_attention import build_attention_plan, torch_attention_forward


@pytest.fixture(scope="module", autouse=True)
def kernel():
    module = native.load("attention_cpu")
    if module is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI must build the compiled attention kernel (g++, ninja)")
        pytest.skip("the compiled attention kernel cannot be built here")
    return module


def varied_layout(n_blocks: int, seed: int = 0) -> torch.Tensor:
    """Fan-in from 1 (row 0 keeps its diagonal only) to n_blocks (rows 1 and -1 keep every block; causal: the
    last row)."""
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(n_blocks, n_blocks, generator=g) < 0.3
    layout[0] = False
    layout |= torch.eye(n_blocks, dtype=torch.bool)
    layout[1] = layout[-1] = True
    return layout


def qkv(B, H, T, D, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, width, generator=g, dtype=torch.float64) for width in (D, D, Dv)]


def reference(q, k, v, layout, block_size, causal, scale, grad, grad_lse):
    """out, lse and (dq, dk, dv) of the dense float64 reference."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = block_attention_reference(q, k, v, layout, block_size, causal=causal, scale=scale, return_lse=True)
    loss = (out * grad).sum() + (0 if grad_lse is None else (lse * grad_lse).sum())
    return out, lse, torch.autograd.grad(loss, (q, k, v))


def close(fast, slow):
    # float32 against float64: sums of up to 6 * 32 products of unit-scale terms
    torch.testing.assert_close(fast.double(), slow, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size,D,Dv", [(16, 64, 64), (32, 32, 32), (32, 64, 64), (4, 6, 7), (8, 20, 20)])
def test_values_and_gradients_equal_the_float64_reference(causal, block_size, D, Dv):
    layout = varied_layout(6)
    fan_in = (torch.tril(layout) if causal else layout).sum(1)
    assert fan_in.min() == 1 and fan_in.max() == 6
    q, k, v = qkv(2, 2, 6 * block_size, D, Dv)
    plan = attention_plan(register_layout(layout, block_size), causal, torch.device("cpu"))
    q32, k32, v32 = (t.float() for t in (q, k, v))
    assert native_applies(q32, v32)
    out, lse = native_attention_forward(q32, k32, v32, plan, block_size, 0.3)
    assert out.dtype == lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    g = torch.Generator().manual_seed(1)
    grad, grad_lse = torch.randn(out.shape, generator=g, dtype=torch.float64), torch.randn(lse.shape, generator=g,
                                                                                           dtype=torch.float64)
    for dl in (None, grad_lse):
        ref, ref_lse, ref_grads = reference(q, k, v, layout, block_size, causal, 0.3, grad, dl)
        close(out, ref)
        close(lse, ref_lse)
        grads = native_attention_backward(grad.float(), q32, k32, v32, out, lse, plan, block_size, 0.3,
                                          None if dl is None else dl.float())
        for fast, slow in zip(grads, ref_grads):
            close(fast, slow)


@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_attention_runs_the_compiled_kernel_on_float32(causal, monkeypatch):
    """The op's output and gradients are the compiled kernel's, bit for bit (a gradient on lse included);
    with PIXELFLY_NATIVE=0 the op runs the fused chunks instead."""
    layout, b = varied_layout(8, seed=2), 16
    q, k, v = (t.float().requires_grad_() for t in qkv(1, 2, 8 * b, 32, 32, seed=3))
    plan = attention_plan(register_layout(layout, b), causal, torch.device("cpu"))
    out, lse = block_sparse_attention(q, k, v, layout, b, causal=causal, return_lse=True)
    native_out, native_lse = native_attention_forward(q.detach(), k.detach(), v.detach(), plan, b, 32 ** -0.5)
    assert torch.equal(out, native_out) and torch.equal(lse, native_lse)
    grad, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * grad).sum() + (lse * grad_lse).sum(), (q, k, v))
    expected = native_attention_backward(grad, q.detach(), k.detach(), v.detach(), native_out, native_lse, plan, b,
                                         32 ** -0.5, grad_lse)
    assert all(torch.equal(a, e) for a, e in zip(grads, expected))
    monkeypatch.setenv("PIXELFLY_NATIVE", "0")
    assert not native_applies(q, v)
    fused = torch_attention_forward(q.detach(), k.detach(), v.detach(), plan, b, 32 ** -0.5)[0]
    assert torch.equal(block_sparse_attention(q, k, v, layout, b, causal=causal), fused)


def test_nan_stays_in_its_batch_element():
    """A NaN query in batch element 0 makes that element's rows NaN and leaves element 1 exact (buffers
    reused across heads carry nothing over)."""
    layout, b = varied_layout(4, seed=4), 16
    q, k, v = qkv(2, 2, 4 * b, 32, 32, seed=5)
    q[0, 1, 3, 0] = float("nan")
    plan = attention_plan(register_layout(layout, b), False, torch.device("cpu"))
    q32, k32, v32 = (t.float() for t in (q, k, v))
    out, lse = native_attention_forward(q32, k32, v32, plan, b, 0.2)
    grad = torch.randn(out.shape, dtype=torch.float64)
    dq, dk, dv = native_attention_backward(grad.float(), q32, k32, v32, out, lse, plan, b, 0.2)
    assert out[0, 1, 3].isnan().all() and lse[0, 1, 3].isnan()
    assert dk[0, 1].isnan().any() and dv[0, 1].isnan().any()
    ref, ref_lse, ref_grads = reference(q[1:], k[1:], v[1:], layout, b, False, 0.2, grad[1:], None)
    close(out[1:], ref)
    close(lse[1:], ref_lse)
    for fast, slow in zip((dq, dk, dv), ref_grads):
        close(fast[1:], slow)
    for t in (out, lse, dq, dk, dv):
        assert not t[0, 0].isnan().any()                # the other head of element 0 too


@pytest.mark.parametrize("causal", [False, True])
def test_key_blocks_no_row_keeps_get_zero_gradients(causal):
    """dK and dV of a key block that no row keeps (its first product would have overwritten them) are zero,
    in memory that held garbage before (NaN-filled, then freed for the kernel's outputs)."""
    layout, b = varied_layout(6, seed=8), 16
    layout[:, 3] = False                       # column 3: kept by no row
    layout[3, 0] = True
    q, k, v = qkv(1, 2, 6 * b, 32, 32, seed=9)
    plan = attention_plan(register_layout(layout, b), causal, torch.device("cpu"))
    q32, k32, v32 = (t.float() for t in (q, k, v))
    out, lse = native_attention_forward(q32, k32, v32, plan, b, 0.3)
    grad = torch.randn(out.shape, dtype=torch.float64)
    for _ in range(3):                         # the allocator hands the NaN-filled blocks back
        torch.full((3, 1, 2, 6 * b, 32), float("nan")).sum()
    dq, dk, dv = native_attention_backward(grad.float(), q32, k32, v32, out, lse, plan, b, 0.3)
    assert (dk[:, :, 3 * b:4 * b] == 0).all() and (dv[:, :, 3 * b:4 * b] == 0).all()
    for fast, slow in zip((dq, dk, dv), reference(q, k, v, layout, b, causal, 0.3, grad, None)[2]):
        close(fast, slow)


def test_threads_split_heads_with_the_same_results():
    """Two threads (heads split between them) give the one-thread results, bit for bit."""
    layout, b = varied_layout(8, seed=6), 16
    q, k, v = (t.float() for t in qkv(2, 3, 8 * b, 32, 32, seed=7))
    plan = attention_plan(register_layout(layout, b), True, torch.device("cpu"))
    grad = torch.randn(q.shape)
    results = []
    threads = torch.get_num_threads()
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            out, lse = native_attention_forward(q, k, v, plan, b, 0.25)
            results.append((out, lse) + native_attention_backward(grad, q, k, v, out, lse, plan, b, 0.25))
        finally:
            torch.set_num_threads(threads)
    assert all(torch.equal(a, c) for a, c in zip(*results))


def test_bad_input_raises():
    layout, b = varied_layout(4), 4
    plan = build_attention_plan(layout, b, False, "cpu")
    q, k, v = (t.float() for t in qkv(1, 1, 16, 8, 8))
    with pytest.raises(TypeError, match="AttentionPlan"):
        native_attention_forward(q, k, v, None, b, 1.0)
    with pytest.raises(TypeError, match="float32"):
        native_attention_forward(q, k.double(), v, plan, b, 1.0)
    with pytest.raises(ValueError, match="share"):
        native_attention_forward(q, k[:, :, :8], v, plan, b, 1.0)
    with pytest.raises(ValueError, match="row_ptr"):
        native_attention_forward(q, k, v, plan, 2 * b, 1.0)
    with pytest.raises(ValueError, match="scale"):
        native_attention_forward(q, k, v, plan, b, -1.0)
    causal_cols = build_attention_plan(layout, b, True, "cpu")
    with pytest.raises(ValueError, match="ascending"):     # a causal kernel on a row right of its diagonal
        native_attention_forward(q, k, v, type(plan)(plan.buckets, plan.row_ptr, plan.col_index, True), b, 1.0)
    assert causal_cols.causal and not plan.causal
