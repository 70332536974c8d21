"""block_sparse_attention: the gathered fast path against the dense masked softmax, values and gradients."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixelfly_lab.ops.attention import (
    attention_plan,
    block_attention_reference,
    block_sparse_attention,
    block_sparse_linear_attention,
)
from pixelfly_lab.ops.registry import register_layout
from pixelfly_lab.structure.masks import flat_butterfly_mask, layout_to_mask


def uneven_layout(n_blocks: int, seed: int = 0) -> torch.Tensor:
    """Random blocks + the diagonal + a global row and a global column: fan-in from 1 to n_blocks."""
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(n_blocks, n_blocks, generator=g) < 0.25
    layout |= torch.eye(n_blocks, dtype=torch.bool)
    layout[1] = True
    layout[:, 2] = True
    return layout


def qkv(B=2, H=3, T=24, D=5, Dv=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, D), (B, H, T, D), (B, H, T, Dv or D)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


LAYOUTS = {"uneven": lambda R: uneven_layout(R), "butterfly": lambda R: flat_butterfly_mask(R, 2),
           "dense": lambda R: torch.ones(R, R, dtype=torch.bool)}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_values_and_gradients_equal_reference(causal, layout_name):
    block_size, T = 4, 32
    layout = LAYOUTS[layout_name](T // block_size)
    q, k, v = qkv(T=T, Dv=7)
    out = block_sparse_attention(q, k, v, layout, block_size, causal=causal, scale=0.7)
    ref = block_attention_reference(q, k, v, layout, block_size, causal=causal, scale=0.7)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    fast = torch.autograd.grad(out, (q, k, v), grad)
    slow = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_reference_is_softmax_over_kept_entries():
    # oracle independent of the code under test: explicit per-row softmax over the kept set
    layout = uneven_layout(4, seed=3)
    q, k, v = (t.detach() for t in qkv(B=1, H=1, T=8, D=3))
    mask = torch.tril(layout_to_mask(layout, 2))
    out = block_sparse_attention(q, k, v, layout, 2, causal=True)
    for i in range(8):
        kept = mask[i].nonzero().flatten()
        weights = torch.softmax(q[0, 0, i] @ k[0, 0, kept].T / 3 ** 0.5, 0)
        torch.testing.assert_close(out[0, 0, i], weights @ v[0, 0, kept], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(causal):
    q, k, v = qkv(B=1, H=2, T=12, D=3)
    layout = uneven_layout(4, seed=1)
    assert torch.autograd.gradcheck(
        lambda q, k, v: block_sparse_attention(q, k, v, layout, 3, causal=causal), (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_chunks_of_rows_give_the_same_values_and_gradients(causal, monkeypatch):
    """Rows processed one block row at a time (the smallest chunk) equal the reference."""
    from pixelfly_lab.ops import torch_attention

    monkeypatch.setattr(torch_attention, "CHUNK_BYTES", 1)
    assert_equals_reference(uneven_layout(8, seed=5), causal)


def assert_equals_reference(layout, causal, block_size=4):
    """The fast path's values and gradients equal the dense masked reference's (float64)."""
    q, k, v = qkv(T=8 * block_size, Dv=6)
    out = block_sparse_attention(q, k, v, layout, block_size, causal=causal)
    ref = block_attention_reference(q, k, v, layout, block_size, causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [32, 64])
def test_hardware_blocks_give_the_reference_values_and_gradients(block_size, causal):
    """The block sizes the layers use (32, 64) on the connected layout and the paper's flat butterfly, float64."""
    from pixelfly_lab.nn.attention import connected_layout

    for layout in (connected_layout(8 * block_size, block_size)[0], flat_butterfly_mask(8, 2)):
        assert_equals_reference(layout, causal, block_size)


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_causal_rows_without_their_diagonal_block_are_masked_as_the_reference(chunk_bytes, monkeypatch):
    """Causal: the diagonal-only mask (every row keeps its diagonal block, the last one) and the general one
    (each chunk's own mask), whole buckets and one block row per chunk."""
    from pixelfly_lab.ops import torch_attention

    if chunk_bytes is not None:
        monkeypatch.setattr(torch_attention, "CHUNK_BYTES", chunk_bytes)
    layout = uneven_layout(8, seed=4)
    layout[5, 5] = layout[6, 6] = False                  # rows 5, 6 keep blocks left of the diagonal only
    layout[5, 0] = layout[6, 1] = True
    for name, lay in (("diagonal kept", uneven_layout(8, seed=4)), ("diagonal dropped", layout)):
        plan = attention_plan(register_layout(lay, 4), True, torch.device("cpu"))
        general = [bucket.upper is None for bucket in plan.buckets if bucket.masked is not None]
        assert any(general) == (name == "diagonal dropped")            # both paths run
        assert_equals_reference(lay, True)


def test_plan_buckets_rows_by_fan_in_and_never_pads_to_dense():
    layout = uneven_layout(8)
    plan = attention_plan(register_layout(layout, 4), False, torch.device("cpu"))
    fan_in = layout.sum(1)
    seen = torch.cat([bucket.rows for bucket in plan.buckets]).sort().values
    assert torch.equal(seen, torch.arange(8))
    for bucket in plan.buckets:
        assert (fan_in[bucket.rows] == bucket.cols.shape[1]).all()     # no padded blocks
        assert layout[bucket.rows[:, None], bucket.cols].all()


def test_float32_and_bfloat16_close_to_float64():
    q, k, v = qkv(T=32)
    layout = flat_butterfly_mask(8, 2)
    ref = block_attention_reference(q, k, v, layout, 4, causal=True)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        out = block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), layout, 4, causal=True)
        assert out.dtype == dtype
        assert ((out.double() - ref).norm() / ref.norm()).item() < tol


def test_compiles_without_graph_break():
    q, k, v = (t.detach().float() for t in qkv(T=16))
    layout = flat_butterfly_mask(4, 1)
    fn = torch.compile(lambda q, k, v: block_sparse_attention(q, k, v, layout, 4, causal=True),
                       backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), block_sparse_attention(q, k, v, layout, 4, causal=True))


def test_bad_input_names_the_argument(monkeypatch):
    # CPU tensors refuse backend='triton' only where Triton's interpreter is off; another test
    # module of the same worker process may have switched it on
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = (t.detach() for t in qkv(T=16))
    layout = torch.eye(4, dtype=torch.bool)
    cases = [
        ((q, k, v, torch.zeros(4, 4, dtype=torch.bool), 4), {}, "layout rows"),
        ((q, k, v, torch.eye(4, dtype=torch.bool).roll(1, 1), 4), {"causal": True}, "diagonal"),
        ((q[:, :, :15], k[:, :, :15], v[:, :, :15], layout, 4), {}, "multiple of block_size"),
        ((q, k, v, torch.eye(8, dtype=torch.bool), 4), {}, "layout must have shape"),
        ((q, k, v, layout.int(), 4), {}, "layout must be a bool"),
        ((q, k[:, :1], v, layout, 4), {}, "k must have the shape"),
        ((q, k, v[:, :, :8], layout, 4), {}, "v must have shape"),
        ((q, k.float(), v, layout, 4), {}, "k has dtype"),
        ((q[0], k[0], v[0], layout, 4), {}, "q must have shape"),
        ((q, k, v, layout, 4), {"scale": -1.0}, "scale"),
        ((q, k, v, layout, 4), {"backend": "cuda"}, "backend"),
        ((q, k, v, layout, 4), {"backend": "triton"}, "backend='triton'"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            block_sparse_attention(*args, **kwargs)
    with pytest.raises(TypeError, match="block_size"):
        block_sparse_attention(q, k, v, layout, 4.0)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        block_sparse_attention(q.numpy(), k, v, layout, 4)


def test_triton_kernels_in_the_interpreter():
    # TRITON_INTERPRET=1 must be set before triton is imported: run in a fresh interpreter
    pytest.importorskip("triton")
    code = r'''
import torch
from pixelfly_lab.ops.attention import block_sparse_attention, block_attention_reference
from pixelfly_lab.ops.registry import derived_count, register_layout, registered_count
from tests.test_block_attention import qkv, uneven_layout
key = register_layout(uneven_layout(4, seed=2), 16)
before = registered_count(), derived_count()
q, k, v = qkv(B=1, H=2, T=64, D=12, Dv=20)
block_sparse_attention(q, k, v, key, 16, causal=True, backend="triton")
# one cache: the effective layout checked, its tables built; no new (block-1) layout registered
assert (registered_count(), derived_count()) == (before[0], before[1] + 2), (before, registered_count(), derived_count())
for causal in (False, True):
    q, k, v = qkv(B=1, H=2, T=64, D=12, Dv=20)
    layout = uneven_layout(4, seed=2)
    out, lse = block_sparse_attention(q, k, v, layout, 16, causal=causal, backend="triton", return_lse=True)
    ref, ref_lse = block_attention_reference(q, k, v, layout, 16, causal=causal, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    grad, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    fast = torch.autograd.grad((out * grad).sum() + (lse * grad_lse).sum(), (q, k, v))
    slow = torch.autograd.grad((ref * grad).sum() + (ref_lse * grad_lse).sum(), (q, k, v))
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
print("ok")
'''
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "ok"


@pytest.mark.parametrize("causal", [False, True])
def test_lse_output_and_its_gradient(causal):
    q, k, v = qkv(B=1, H=2, T=12, D=3)
    layout = uneven_layout(4, seed=1)
    out, lse = block_sparse_attention(q, k, v, layout, 3, causal=causal, return_lse=True)
    ref_out, ref_lse = block_attention_reference(q, k, v, layout, 3, causal=causal, return_lse=True)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda q, k, v: block_sparse_attention(q, k, v, layout, 3, causal=causal, return_lse=True), (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_on_layout_equals_masked_dense(causal):
    g = torch.Generator().manual_seed(0)
    phi_q, phi_k = torch.rand(2, 2, 16, 3, generator=g, dtype=torch.float64).unbind(0)
    phi_q, phi_k = phi_q[None], phi_k[None]
    v = torch.randn(1, 2, 16, 5, generator=g, dtype=torch.float64)
    layout = uneven_layout(4, seed=4)
    mask = layout_to_mask(layout, 4)
    if causal:
        mask = torch.tril(mask)
    expected = ((phi_q @ phi_k.transpose(-1, -2)) * mask) @ v
    got = block_sparse_linear_attention(phi_q, phi_k, v, layout, 4, causal=causal)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_fused_and_bmm_chunks_equal_the_reference(causal, layout_name, flash, chunk_bytes, monkeypatch):
    """Both chunk paths of the CPU kernel (torch's fused flash kernel per chunk; bmm's), whole and one
    block row per chunk, against the dense reference (float64): out, lse, and dq, dk, dv with and
    without a gradient on lse (the fused backward takes none: such a call runs the bmm's)."""
    from pixelfly_lab.ops import torch_attention

    if chunk_bytes is not None:
        monkeypatch.setattr(torch_attention, "CHUNK_BYTES", chunk_bytes)
    block_size, T = 4, 32
    layout = LAYOUTS[layout_name](T // block_size)
    q, k, v = qkv(T=T, D=6)
    assert torch_attention.flash_applies(q, v) and not torch_attention.flash_applies(q, v[..., :5])
    plan = attention_plan(register_layout(layout, block_size), causal, torch.device("cpu"))
    with torch.no_grad():
        out, lse = torch_attention.torch_attention_forward(q, k, v, plan, block_size, 0.7, flash=flash)
    ref, ref_lse = block_attention_reference(q, k, v, layout, block_size, causal=causal, scale=0.7, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    grad, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    for dl in (None, grad_lse):
        fast = torch_attention.torch_attention_backward(grad, q.detach(), k.detach(), v.detach(), out, lse, plan,
                                                        block_size, 0.7, dl, flash=flash)
        loss = (ref * grad).sum() + (0 if dl is None else (ref_lse * dl).sum())
        for a, b in zip(fast, torch.autograd.grad(loss, (q, k, v), retain_graph=True)):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_block_sparse_attention_takes_the_fused_chunks_where_they_apply(monkeypatch):
    """block_sparse_attention's output is the fused path's, bit for bit (equal head widths, CPU), with the
    compiled kernel off (PIXELFLY_NATIVE=0; tests/test_native_attention.py holds the op to that kernel)."""
    from pixelfly_lab.ops import torch_attention

    monkeypatch.setenv("PIXELFLY_NATIVE", "0")

    layout = uneven_layout(8, seed=2)
    q, k, v = (t.detach() for t in qkv(T=32, D=6, dtype=torch.float32))
    plan = attention_plan(register_layout(layout, 4), True, torch.device("cpu"))
    fused = torch_attention.torch_attention_forward(q, k, v, plan, 4, 6 ** -0.5, flash=True)[0]
    assert torch.equal(block_sparse_attention(q, k, v, layout, 4, causal=True), fused)


def tiled_layout(n_blocks: int = 20) -> torch.Tensor:
    """uneven_layout with its last three rows whole: fan-in up to n_blocks, causal too (tril'ed)."""
    layout = uneven_layout(n_blocks, seed=6)
    layout[-3:] = True
    return layout


@pytest.mark.parametrize("causal", [False, True])
def test_fused_chunks_that_tile_the_keys_equal_the_float64_reference(causal):
    """float32 at b = 32 with rows of up to 20 blocks (640 keys): torch's flash kernel splits the keys of
    such a row into tiles of 512, with a running max and sum across them. Values and gradients against the
    float64 reference, both with no gradient on lse (the fused backward) and with one (the bmm's)."""
    from pixelfly_lab.ops import torch_attention

    block_size, layout = 32, tiled_layout()
    T = layout.shape[0] * block_size
    fan_in = (torch.tril(layout) if causal else layout).sum(1)
    assert fan_in.max() * block_size > 512 and fan_in.min() * block_size <= 512
    q, k, v = qkv(B=1, H=2, T=T, D=16, seed=1)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    assert torch_attention.flash_applies(q32, v32)
    out, lse = block_sparse_attention(q32, k32, v32, layout, block_size, causal=causal, return_lse=True)
    ref, ref_lse = block_attention_reference(q, k, v, layout, block_size, causal=causal, return_lse=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-4, atol=2e-5)
    grad, grad_lse = torch.randn_like(ref), torch.randn_like(ref_lse)
    for dl in (None, grad_lse):
        fast = torch.autograd.grad((out * grad.float()).sum() + (0 if dl is None else (lse * dl.float()).sum()),
                                   (q32, k32, v32), retain_graph=True)
        slow = torch.autograd.grad((ref * grad).sum() + (0 if dl is None else (ref_lse * dl).sum()), (q, k, v),
                                   retain_graph=True)
        for a, b in zip(fast, slow):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-5)


def test_backward_reaches_the_fused_kernel_unless_lse_gets_a_gradient(monkeypatch):
    """Spy on torch's fused kernels: a plain call's backward runs the fused backward on every chunk (no
    gradient on lse: ``set_materialize_grads(False)`` keeps it None), and only a call whose lse gets a
    gradient falls back to the bmm chunks. The compiled kernel is off (PIXELFLY_NATIVE=0)."""
    monkeypatch.setenv("PIXELFLY_NATIVE", "0")
    from pixelfly_lab.ops import torch_attention

    calls = {"forward": 0, "backward": 0}

    def spy(name, op):
        def counted(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)
        return counted

    monkeypatch.setattr(torch_attention, "_flash_forward", spy("forward", torch_attention._flash_forward))
    monkeypatch.setattr(torch_attention, "_flash_backward", spy("backward", torch_attention._flash_backward))
    layout = uneven_layout(8, seed=2)
    for causal in (False, True):
        plan = attention_plan(register_layout(layout, 4), causal, torch.device("cpu"))
        q, k, v = qkv(B=1, H=2, T=32, D=6, dtype=torch.float32)
        before = dict(calls)
        out = block_sparse_attention(q, k, v, layout, 4, causal=causal)
        out.backward(torch.randn_like(out))
        # one call per (batch x head, bucket) at this size: every chunk is a whole bucket
        assert calls["forward"] - before["forward"] == 2 * len(plan.buckets)
        assert calls["backward"] - before["backward"] == 2 * len(plan.buckets)
        before = dict(calls)
        out, lse = block_sparse_attention(q, k, v, layout, 4, causal=causal, return_lse=True)
        (out.sum() + lse.sum()).backward()
        assert calls["forward"] - before["forward"] == 2 * len(plan.buckets)
        assert calls["backward"] == before["backward"]                 # a gradient on lse: the bmm chunks
