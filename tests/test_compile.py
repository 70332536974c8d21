"""torch.compile, the meta device and host syncs: the layers as a compiler and a large-model user see them.

* ``torch.compile(model, fullgraph=True)`` of a Pixelfly MLP traces forward and backward through
  the block-sparse custom ops (``torch.ops.pixelfly_lab.*``) in one graph, and matches eager in
  values and gradients. The 'aot_eager' backend traces exactly what inductor would get (dynamo's
  graph, AOTAutograd's forward and backward graphs) without a C++ compile, so the test stays fast.
* No forward or backward reads a tensor back to the host: layers built on the meta device (where
  reading a value raises) run forward and backward on meta inputs, through every backend's op.
* Every layer constructs on the meta device and, after ``to_empty`` + ``reset_parameters``, holds
  its structure (layout, mask) exactly and freshly drawn parameters.
"""

import pytest
import torch
import torch.utils._python_dispatch
from torch import nn

from pixelfly_lab.ops import matmul as kernels
from pixelfly_lab.ops.native_linear import native_takes
from pixelfly_lab.nn.butterfly import ButterflyLinear
from pixelfly_lab.nn.layers import (BlockSparseLinear, LowRankLinear, MaskedLinear, MonarchLinear,
                                 PixelflyLinear, SparseLowRankLinear)
from pixelfly_lab.structure.masks import flat_block_butterfly_layout


def pixelfly_mlp(backend: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(PixelflyLinear(64, 128, butterfly_size=8, n_factors=2, rank=4, block_size=8,
                                        backend=backend),
                         nn.GELU(),
                         PixelflyLinear(128, 64, butterfly_size=8, n_factors=2, rank=4, block_size=8,
                                        backend=backend)).double()


def values_and_grads(model, x):
    y = model(x)
    probe = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    return y, torch.autograd.grad(y, [x, *model.parameters()], probe)


def op_names(graph_module) -> set:
    return {str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_compiled_pixelfly_mlp_has_one_graph_and_matches_eager(backend):
    torch._dynamo.reset()
    model = pixelfly_mlp(backend)
    x = torch.randn(3, 5, 64, dtype=torch.float64, requires_grad=True)
    y_eager, g_eager = values_and_grads(model, x)
    graphs = []

    def recording_aot_eager(gm, example_inputs):  # dynamo's graph, then AOTAutograd's fw/bw graphs
        graphs.append(gm)
        from torch._dynamo.backends.common import aot_autograd

        def keep(g, _):
            graphs.append(g)

            def boxed(args):   # AOTAutograd's calling convention: one list of arguments
                return g(*args)
            boxed._boxed_call = True
            return boxed
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=recording_aot_eager)
    y, grads = values_and_grads(compiled, x)
    torch.testing.assert_close(y, y_eager, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, g_eager):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dynamo_graph, *aot_graphs = graphs
    assert len(aot_graphs) == 2, "one forward and one backward graph"
    names = set().union(*(op_names(g) for g in aot_graphs))
    if backend == "torch":
        assert {"pixelfly_lab.sparse_lowrank_torch.default",
                "pixelfly_lab.sparse_lowrank_torch_backward.default"} <= names
    if backend == "reference":  # plain torch ops, the custom ops are not used
        assert not any(name.startswith("pixelfly_lab") for name in names)


def test_compiled_model_has_no_graph_break():
    torch._dynamo.reset()
    model = pixelfly_mlp("torch")
    explanation = torch._dynamo.explain(model)(torch.randn(4, 64, dtype=torch.float64))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_forward_and_backward_run_on_meta_tensors(backend):
    """Meta tensors have no values: any read of one on the host (.item(), int(t.sum())) raises."""
    model = pixelfly_mlp(backend)
    meta = nn.Sequential(*model).to("meta")
    x = torch.empty(7, 64, dtype=torch.float64, device="meta", requires_grad=True)
    y = meta(x)
    assert y.shape == (7, 64) and y.is_meta
    grads = torch.autograd.grad(y.sum(), [x, *meta.parameters()])
    assert [g.shape for g in grads] == [x.shape] + [p.shape for p in meta.parameters()]


def layers_to_build():
    layout = flat_block_butterfly_layout(64, 32, 4, 1, 8)
    mask = torch.rand(64, 32, generator=torch.Generator().manual_seed(0)) < 0.3
    return {
        "masked": lambda **f: MaskedLinear(32, 64, mask, **f),
        "blocksparse": lambda **f: BlockSparseLinear(32, 64, layout, 8, **f),
        "lowrank": lambda **f: LowRankLinear(32, 64, 4, **f),
        "sparse_lowrank": lambda **f: SparseLowRankLinear(32, 64, layout, 8, rank=3, **f),
        "pixelfly": lambda **f: PixelflyLinear(32, 64, butterfly_size=4, n_factors=2, rank=2, block_size=8, **f),
        "monarch": lambda **f: MonarchLinear(32, 64, 4, **f),
        "butterfly": lambda **f: ButterflyLinear(32, bias=True, **f),
    }


@pytest.mark.parametrize("name", list(layers_to_build()))
def test_every_layer_constructs_on_meta_then_materialises(name):
    build = layers_to_build()[name]
    torch.manual_seed(0)
    reference = build()
    layer = build(device="meta")
    assert all(t.is_meta for t in [*layer.parameters(), *layer.buffers()])
    layer.to_empty(device="cpu")
    for module in layer.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    for (key, got), want in zip(layer.state_dict().items(), reference.state_dict().values()):
        assert got.shape == want.shape, key
        if got.dtype == torch.bool:             # structure: restored exactly
            assert torch.equal(got, want), key
        else:                                    # parameters: drawn afresh at the reference's scale
            assert torch.isfinite(got).all(), key
            ratio = (got.float().std() / want.float().std()).item()
            assert 0.5 < ratio < 2.0, (key, ratio)
    x = torch.randn(5, 32)
    bias = 0 if layer.bias is None else layer.bias
    if name == "butterfly":  # a square layer: W is 32 x 32
        torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + bias, rtol=1e-4, atol=1e-5)
        return
    torch.testing.assert_close(layer(x), x @ layer.dense_weight().T + bias, rtol=1e-4, atol=1e-5)


def test_loading_a_state_dict_with_another_layout_takes_the_new_layout():
    a = BlockSparseLinear(32, 32, torch.eye(4, dtype=torch.bool), 8)
    other = torch.eye(4, dtype=torch.bool).flip(0)
    b = BlockSparseLinear(32, 32, other, 8)
    a.load_state_dict(b.state_dict())
    x = torch.randn(3, 32)
    torch.testing.assert_close(a(x), b(x))
    assert kernels.registered_layout(a._layout_key).layout.equal(other)


def test_registered_layouts_are_validated_and_shared():
    layout = torch.tensor([[True, False], [True, True]])
    key = kernels.register_layout(layout, 4)
    assert kernels.register_layout(layout.clone(), 4) == key
    assert kernels.register_layout(layout, 8) != key
    entry = kernels.registered_layout(key)
    assert (entry.nnz, entry.out_features, entry.in_features) == (3, 8, 8)
    with pytest.raises(ValueError, match="layout"):
        kernels.register_layout(layout.int(), 4)
    with pytest.raises(ValueError, match="block_size"):
        kernels.register_layout(layout, 0)
    with pytest.raises(ValueError, match="layout_key"):
        kernels.registered_layout(-5)
    values = torch.randn(3, 4, 4)
    with pytest.raises(ValueError, match="layout_key"):  # a key of another shape
        kernels.block_sparse_matmul(torch.randn(2, 8), values, layout,
                                    layout_key=kernels.register_layout(torch.ones(2, 3, dtype=torch.bool), 4))


def test_operands_on_another_device_are_refused():
    layout = torch.eye(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="values is on meta"):
        kernels.block_sparse_matmul(torch.randn(3, 8), torch.randn(2, 4, 4, device="meta"), layout)


def test_compiled_under_cpu_autocast_matches_eager():
    """Forward and backward under bf16 autocast, compiled (AOT autograd through the custom op and its
    compute-dtype argument) and eager: the same output and parameter gradients."""
    torch._dynamo.reset()
    model = pixelfly_mlp("torch").float()
    x = torch.randn(6, 64)

    def run(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return y, grads
    got, got_grads = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    want, want_grads = run(model)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)
    assert all(g.dtype == torch.float32 for g in got_grads)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


TRITON_OP_COMPILED = """
import os; os.environ["TRITON_INTERPRET"] = "1"
import torch
import torch.utils._python_dispatch
from torch import nn
from pixelfly_lab.nn.layers import PixelflyLinear
torch.manual_seed(0)
model = nn.Sequential(PixelflyLinear(32, 64, butterfly_size=4, n_factors=2, rank=3, block_size=16, backend="triton"),
                      nn.GELU(), PixelflyLinear(64, 32, butterfly_size=4, n_factors=2, rank=3, block_size=16,
                                                backend="triton")).double()
x = torch.randn(5, 32, dtype=torch.float64, requires_grad=True)
def run(m):
    y = m(x)
    return y, torch.autograd.grad(y, [x, *model.parameters()], torch.cos(y))
y_eager, g_eager = run(model)
y, g = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
torch.testing.assert_close(y, y_eager)
for a, b in zip(g, g_eager):
    torch.testing.assert_close(a, b)
print("ok")
"""


def test_compiled_triton_op_matches_eager_under_the_interpreter():
    """The Triton path's custom ops (fake impls, autograd) traced by torch.compile(fullgraph=True);
    a subprocess, since TRITON_INTERPRET must be set before triton is imported."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    run = subprocess.run([sys.executable, "-c", TRITON_OP_COMPILED], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_unpickled_layer_registers_its_layout_in_the_new_process(other_process_registry):
    """A pickled model carries its layout buffer; the int key is only this process's."""
    import pickle

    layer = PixelflyLinear(32, 64, butterfly_size=4, n_factors=2, rank=2, block_size=8)
    x = torch.randn(3, 32)
    want = layer(x)
    data = pickle.dumps(layer)
    # a process whose registry holds other layouts: the old key would name another layout
    kernels.register_layout(torch.ones(8, 4, dtype=torch.bool), 8)
    copy = pickle.loads(data)
    assert kernels.registered_layout(copy.sparse._layout_key).layout.equal(layer.sparse.layout)
    torch.testing.assert_close(copy(x), want)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten and custom ops that run (by name)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("autocast", [False, True])
def test_training_steps_plan_nothing_after_the_first(autocast):
    """Plans and index tables are built once per (layout, device) in the registry: later forward
    and backward passes of the layer (also under autocast) register and build nothing."""
    from pixelfly_lab.ops import registry

    torch.manual_seed(0)
    layer = PixelflyLinear(256, 1024, butterfly_size=8, n_factors=2, rank=4, block_size=32, backend="torch")
    x = torch.randn(16, 256, requires_grad=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        y.float().sum().backward()
    step()
    layouts, builds = registry.registered_count(), registry.derived_count()
    for _ in range(3):
        step()
    assert (registry.registered_count(), registry.derived_count()) == (layouts, builds)


def test_autocast_casts_once_and_runs_one_op():
    """Under autocast the product casts each operand at most once and calls the custom op once (no
    second pass through the checks and dispatch): where the compiled bfloat16 sweep runs (AMX, AVX512-BF16),
    nothing is cast (the op computes in bfloat16 and rounds x and the parameters itself), elsewhere
    x and the four parameters are; values as the reference's under the same autocast."""
    torch.manual_seed(0)
    layer = PixelflyLinear(256, 1024, butterfly_size=8, n_factors=2, rank=4, block_size=32, backend="torch")
    x = torch.randn(16, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16), _OpCounter() as counter:
        y = layer(x)
    ops = [n for n in counter.names if n.startswith("pixelfly_lab.")]
    assert ops == ["pixelfly_lab.sparse_lowrank_torch"], counter.names
    casts = 0 if native_takes(torch.bfloat16, "cpu", 32) else 5   # x, the blocks, U, V and the bias
    assert counter.names.count("aten._to_copy") == casts, counter.names
    layer.backend = "reference"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x)
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)


def _graph_names(tensor: torch.Tensor, depth: int = 4) -> set[str]:
    """The names of the autograd nodes within ``depth`` steps of ``tensor``'s grad_fn."""
    names, frontier = set(), [tensor.grad_fn]
    for _ in range(depth):
        frontier = [f for f in frontier if f is not None]
        names |= {type(f).__name__ for f in frontier}
        frontier = [g for f in frontier for g, _ in f.next_functions]
    return names


@pytest.mark.parametrize("autocast", [False, True])
def test_eager_calls_take_the_ops_functions_without_the_op(autocast):
    """An eager call runs the 'torch' op's own forward and backward without its dispatch
    (EagerTorchProduct); under a dispatch mode (what FLOP counters, fake tensors and the toolkit's
    timers use) the op runs. Values and every gradient bit for bit the same (one thread), with
    bfloat16 autocast too; a backward that builds a graph refuses a second derivative, as the op's."""
    torch.manual_seed(0)
    layer = PixelflyLinear(256, 1024, butterfly_size=8, n_factors=2, rank=4, block_size=32, backend="torch")
    x = torch.randn(40, 256, requires_grad=True)
    gy = torch.randn(40, 1024)

    def run():
        for t in (x, *layer.parameters()):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        y.backward(gy.to(y.dtype))
        return y.detach(), [t.grad.clone() for t in (x, *layer.parameters())], _graph_names(y)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        y_eager, g_eager, eager_names = run()
        with _OpCounter() as counter:
            y_op, g_op, op_names = run()
    finally:
        torch.set_num_threads(previous)
    assert "EagerTorchProductBackward" in eager_names and "EagerTorchProductBackward" not in op_names
    assert "pixelfly_lab.sparse_lowrank_torch" in counter.names
    assert torch.equal(y_eager, y_op)
    for a, b in zip(g_eager, g_op):
        assert torch.equal(a, b)
    for loss in (lambda y: (y * y).sum(), lambda y: y.sum()):   # a second derivative: refused, as by the op
        (g,) = torch.autograd.grad(loss(layer(x)), x, create_graph=True)
        with pytest.raises(RuntimeError, match="autograd formula"):
            (g * g).sum().backward()


def test_eager_calls_step_aside_for_modes_and_partial_gradients():
    """Under a function mode (``torch.device`` as a context) the op runs, and gives what the eager
    path gives; frozen blocks and an x without gradient take the eager path with the gradients
    that are asked for only."""
    torch.manual_seed(1)
    layer = PixelflyLinear(256, 1024, butterfly_size=8, n_factors=2, rank=4, block_size=32, backend="torch")
    x = torch.randn(24, 256)
    eager_y = layer(x)
    assert "EagerTorchProductBackward" in _graph_names(eager_y)
    with torch.device("meta"):
        moded = layer(x)
    assert moded.device.type == "cpu" and "EagerTorchProductBackward" not in _graph_names(moded)
    torch.testing.assert_close(moded, eager_y, rtol=0, atol=0)
    layer.sparse.values.requires_grad_(False)
    layer(x).sum().backward()
    assert layer.sparse.values.grad is None and x.grad is None
    assert all(p.grad is not None for p in (layer.bias, layer.lowrank.u, layer.lowrank.v))
