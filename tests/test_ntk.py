"""Empirical NTK: every method against the per-example autograd loop, in float64.

The loop (method='loop') builds J row by row with torch.autograd.grad: the slow, obviously
correct reference. Every fast path (Jacobian contraction, NTK-vector products, structured
derivatives, 'auto'), chunked or not, must equal it to float64 rounding, for dense and sparse
models, with and without x2, traced and untraced. Plus closed forms (a linear model's kernel)
and the distances' invariances.
"""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pixelfly_lab.nn import layers
from pixelfly_lab.ntk import empirical as ntk
from pixelfly_lab.ntk import methods, structured
from pixelfly_lab.training.models import Mixer
from pixelfly_lab.ntk.empirical import empirical_ntk, kernel_distance, spectra
from pixelfly_lab.structure.patterns import make_pattern

# torch 2.13's forward-mode decompositions (loaded by the first jvp) still call torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

FAST = ("jacobian", "ntvp", "structured", "auto")
TOL = dict(rtol=1e-10, atol=1e-12)


def _mlp(middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), middle, nn.GELU(), nn.Linear(16, 3)).double()


def _models():
    """name -> (model factory, input shape of one example); small, float64."""
    layout = make_pattern("random", 16, 16, 0.5, block_size=4, seed=1).layout
    return {
        "dense": (lambda: _mlp(nn.Linear(16, 16)), (6,)),
        "blocksparse": (lambda: _mlp(layers.BlockSparseLinear(16, 16, layout, 4)), (6,)),
        "pixelfly": (lambda: _mlp(layers.PixelflyLinear(16, 16, budget=0.7, block_size=4)), (6,)),
        "lowrank": (lambda: _mlp(layers.LowRankLinear(16, 16, 3)), (6,)),
        "monarch": (lambda: _mlp(layers.MonarchLinear(16, 16, 4)), (6,)),
        "gated": (lambda: _mlp(layers.SparseLowRankLinear(16, 16, layout, 4, rank=2, gating=True)), (6,)),
        # the authors' layer: gated, kaiming factors (no structured rule: the gate declines it)
        "pixelfly_gated": (lambda: _mlp(layers.PixelflyLinear(16, 16, budget=0.7, block_size=4, gating=True,
                                                              lowrank_init="kaiming")), (6,)),
        # weights shared over tokens and channels, LayerNorm parameters on the Jacobian path
        "mixer": (lambda: (torch.manual_seed(0), Mixer((1, 4, 4), 2, 8, 1, 2).double())[1], (1, 4, 4)),
    }


MODELS = _models()


def _inputs(shape, n, seed):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def references():
    """(model name, with x2, trace) -> (model, x1, x2, loop kernel), computed once."""
    cache = {}

    def get(name, with_x2, trace):
        key = (name, with_x2, trace)
        if key not in cache:
            factory, shape = MODELS[name]
            model, x1 = factory(), _inputs(shape, 5, 1)
            x2 = _inputs(shape, 3, 2) if with_x2 else None
            cache[key] = model, x1, x2, empirical_ntk(model, x1, x2, method="loop", trace=trace)
        return cache[key]

    return get


@pytest.mark.parametrize("trace", [True, False])
@pytest.mark.parametrize("with_x2", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_equals_the_loop(references, name, with_x2, trace):
    model, x1, x2, ref = references(name, with_x2, trace)
    assert ref.shape == (5, 3 if with_x2 else 5) + (() if trace else (model(x1[:1]).shape[1],) * 2)
    for method in FAST:
        kernel = empirical_ntk(model, x1, x2, method=method, trace=trace)
        torch.testing.assert_close(kernel, ref, **TOL, msg=f"method={method}")


@pytest.mark.parametrize("method", ["jacobian", "ntvp", "structured"])
@pytest.mark.parametrize("name", ["pixelfly", "mixer"])
def test_chunked_equals_unchunked(references, name, method):
    """Chunks of examples (1, 2), and a small memory budget that cuts parameters into groups."""
    configs = ((False, True), (True, False)) if name == "pixelfly" else ((True, False),)  # mixer: slow
    for with_x2, trace in configs:
        model, x1, x2, ref = references(name, with_x2, trace)
        whole = empirical_ntk(model, x1, x2, method=method, trace=trace, chunk_size=8)
        torch.testing.assert_close(whole, ref, **TOL)
        small = dict(max_memory=40_000 if name == "pixelfly" else 100_000)   # parameters cut into groups
        for options in (dict(chunk_size=1), dict(chunk_size=2), small)[name == "mixer":]:
            chunked = empirical_ntk(model, x1, x2, method=method, trace=trace, **options)
            torch.testing.assert_close(chunked, whole, **TOL, msg=f"{options}")


def test_small_budget_cuts_parameters_into_groups():
    """A budget below one tensor's Jacobian cuts it into slices; the groups cover it exactly."""
    model, x = MODELS["dense"][0](), _inputs((6,), 5, 1)
    prob = ntk._setup(model, x, None, "jacobian", True, None, 4096, None)
    chunk, groups, cache = methods._plan_groups(prob, prob.trainable, None)
    assert len(groups) > len(prob.trainable)
    covered = {}
    for group in groups:
        for name, start, stop in group:
            covered.setdefault(name, []).append((start, stop))
    for name, spans in covered.items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == prob.base[name].numel()
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("method", ["jacobian", "structured"])
def test_symmetric_case_computes_each_jacobian_once(monkeypatch, method):
    """With x2=None and a cache that fits, every example goes through features() exactly once."""
    seen = []
    assemble = methods._assemble

    def spy(prob, kernel, features, *args):
        return assemble(prob, kernel, lambda x: (seen.append(len(x)), features(x))[1], *args)

    monkeypatch.setattr(methods, "_assemble", spy)
    model, x = MODELS["dense"][0](), _inputs((6,), 9, 1)
    empirical_ntk(model, x, method=method, chunk_size=2)
    assert sum(seen) == 9
    seen.clear()
    empirical_ntk(model, x, _inputs((6,), 4, 2), method=method, chunk_size=2)
    assert sum(seen) == 13


@pytest.mark.parametrize("method", ["structured", "auto"])
def test_structured_probes_the_outputs_once(monkeypatch, method):
    """One no-grad forward finds each rule's calls and output shape; the check and the kernel reuse it."""
    probes = []
    probe = structured._probe_outputs
    monkeypatch.setattr(structured, "_probe_outputs", lambda prob, modules: (probes.append(1), probe(prob, modules))[1])
    model, x = MODELS["pixelfly"][0](), _inputs((6,), 4, 1)
    kernel = empirical_ntk(model, x, method=method)
    assert len(probes) == 1
    torch.testing.assert_close(kernel, empirical_ntk(model, x, method="loop"), **TOL)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["loop"] + list(FAST))
def test_linear_model_kernel_is_the_input_gram(method, bias):
    """f(x) = W x + b: d f_o / d W[o] = x, d f_o / d b[o] = 1, so K[o, o'] = (x1 . x2 + 1) delta."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=bias).double()
    x1, x2 = _inputs((4,), 5, 1), _inputs((4,), 2, 2)
    gram = x1 @ x2.T + (1.0 if bias else 0.0)
    torch.testing.assert_close(empirical_ntk(model, x1, x2, method=method), 3 * gram, **TOL)
    untraced = empirical_ntk(model, x1, x2, method=method, trace=False)
    torch.testing.assert_close(untraced, gram[:, :, None, None] * torch.eye(3, dtype=torch.float64), **TOL)


def test_frozen_parameters_and_token_inputs():
    """Frozen parameters are left out; integer inputs (token ids) go through an embedding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    model[2].bias.requires_grad_(False)
    x = torch.randint(0, 7, (4, 3), generator=torch.Generator().manual_seed(0))
    ref = empirical_ntk(model, x, method="loop")
    for method in FAST:
        torch.testing.assert_close(empirical_ntk(model, x, method=method), ref, **TOL)


def test_rule_that_does_not_hold_falls_back():
    """A Linear whose weight is also used outside its forward: the rule is caught and dropped."""

    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) + torch.tanh(x @ self.fc.weight)

    torch.manual_seed(0)
    model, x = Reused().double(), _inputs((4,), 4, 1)
    with pytest.warns(UserWarning, match="does not reproduce"):
        kernel = empirical_ntk(model, x, method="structured")
    torch.testing.assert_close(kernel, empirical_ntk(model, x, method="loop"), **TOL)


def test_modules_called_twice_or_by_keyword_fall_back():
    """The taps need one positional call per forward; other uses go through Jacobian contraction."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.fc(input=torch.tanh(self.fc(x))))

    torch.manual_seed(0)
    model, x = Twice().double(), _inputs((4,), 4, 1)
    ref = empirical_ntk(model, x, method="loop")
    torch.testing.assert_close(empirical_ntk(model, x, method="structured"), ref, **TOL)


def test_float32_is_close_to_float64():
    model64, x64 = MODELS["pixelfly"][0](), _inputs((6,), 6, 1)
    model32 = copy.deepcopy(model64).float()
    ref = empirical_ntk(model64, x64, method="loop")
    for method in FAST:
        kernel = empirical_ntk(model32, x64.float(), method=method)
        assert kernel.dtype == torch.float32
        torch.testing.assert_close(kernel.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    model, x = MODELS["pixelfly"][0](), _inputs((6,), 6, 1)
    ref = empirical_ntk(model, x, method="loop")
    model.cuda()
    for method in FAST:
        torch.testing.assert_close(empirical_ntk(model, x.cuda(), method=method).cpu(), ref, **TOL)


@settings(max_examples=8, deadline=None)
@given(n1=st.integers(1, 6), n2=st.integers(1, 4), chunk=st.integers(1, 7), seed=st.integers(0, 99),
       method=st.sampled_from(["jacobian", "structured"]))
def test_kernel_structure(n1, n2, chunk, seed, method):
    """K(x, x) is symmetric PSD, and K(x1, x2) is the off-diagonal block of K([x1; x2])."""
    model = MODELS["lowrank"][0]()
    x1, x2 = _inputs((6,), n1, seed), _inputs((6,), n2, seed + 1000)
    full = empirical_ntk(model, torch.cat([x1, x2]), method=method, chunk_size=chunk)
    torch.testing.assert_close(full, full.T, **TOL)
    assert torch.linalg.eigvalsh(full).min() >= -1e-9 * full.diagonal().max()
    torch.testing.assert_close(empirical_ntk(model, x1, x2, method=method, chunk_size=chunk),
                               full[:n1, n1:], **TOL)


# ----------------------------------------------------------------------------- distances and spectra
def _psd(n, seed):
    a = torch.randn(n, n + 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T


@pytest.mark.parametrize("metric", ntk.DISTANCE_METRICS)
def test_distance_zero_on_identical_kernels(metric):
    k = _psd(6, 0)
    assert kernel_distance(k, k.clone(), metric) == pytest.approx(0.0, abs=1e-12)
    k4 = _psd(8, 1).reshape(4, 2, 4, 2).permute(0, 2, 1, 3)     # (N, N, O, O), positive semi-definite
    assert kernel_distance(k4, k4.clone(), metric) == pytest.approx(0.0, abs=1e-12)


def test_distance_values_and_invariances():
    k1, k2 = _psd(6, 1), _psd(6, 2)
    rel = kernel_distance(k1, k2)
    assert rel == pytest.approx(float(torch.linalg.matrix_norm(k1 - k2) / torch.linalg.matrix_norm(k2)))
    assert kernel_distance(3 * k1, 3 * k2) == pytest.approx(rel)               # joint scaling
    assert kernel_distance(2 * k2, k2) == pytest.approx(1.0)
    for metric in ("alignment", "cka"):
        d = kernel_distance(k1, k2, metric)
        assert 0.0 < d <= 1.0
        assert kernel_distance(5 * k1, 0.1 * k2, metric) == pytest.approx(d)   # each scaled alone
        assert kernel_distance(2 * k1, k1, metric) == pytest.approx(0.0, abs=1e-12)
    # CKA centres: adding a constant to every entry changes nothing
    assert kernel_distance(k1 + 7.0, k2, "cka") == pytest.approx(kernel_distance(k1, k2, "cka"))
    # orthogonal kernels are as far apart as alignment allows
    assert kernel_distance(torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0])),
                           "alignment") == pytest.approx(1.0)


def test_distance_bad_input():
    k = _psd(4, 0)
    with pytest.raises(ValueError, match="k1 and k2 must have the same shape"):
        kernel_distance(k, _psd(5, 0))
    with pytest.raises(ValueError, match="metric"):
        kernel_distance(k, k, "euclid")
    with pytest.raises(ValueError, match="square"):
        kernel_distance(k[:, :3], k[:, :3], "cka")
    with pytest.raises(ValueError, match="k2 is zero"):
        kernel_distance(k, torch.zeros_like(k))
    with pytest.raises(TypeError, match="k1"):
        kernel_distance(k.numpy(), k)


def test_spectra():
    frame = spectra({"a": torch.diag(torch.tensor([1.0, 3.0, 2.0])), "b": torch.eye(2)})
    assert list(frame.columns) == ["name", "index", "eigenvalue", "normalized"]
    a = frame[frame.name == "a"]
    assert a.eigenvalue.tolist() == pytest.approx([3.0, 2.0, 1.0])
    assert a.normalized.sum() == pytest.approx(1.0)
    assert spectra(torch.eye(3)).name.unique().tolist() == ["kernel"]
    with pytest.raises(ValueError, match="square"):
        spectra({"bad": torch.ones(2, 3)})


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    model = MODELS["dense"][0]()
    x = _inputs((6,), 3, 0)
    with pytest.raises(ValueError, match="x2.*same feature shape"):
        empirical_ntk(model, x, _inputs((5,), 3, 0))
    with pytest.raises(ValueError, match="x1 is an empty batch"):
        empirical_ntk(model, x[:0])
    with pytest.raises(ValueError, match="x2 is an empty batch"):
        empirical_ntk(model, x, x[:0])
    with pytest.raises(TypeError, match="x1"):
        empirical_ntk(model, x.numpy())
    with pytest.raises(TypeError, match="model"):
        empirical_ntk(lambda t: t, x)
    frozen = MODELS["dense"][0]().requires_grad_(False)
    with pytest.raises(ValueError, match="model has no trainable parameters"):
        empirical_ntk(frozen, x)
    with pytest.raises(ValueError, match="method"):
        empirical_ntk(model, x, method="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        empirical_ntk(model, x, chunk_size=0)
    with pytest.raises(ValueError, match="max_memory"):
        empirical_ntk(model, x, max_memory=-1)
    with pytest.raises(TypeError, match="trace"):
        empirical_ntk(model, x, trace="yes")


def test_default_memory_budget_is_sane():
    budget = ntk.default_max_memory(torch.device("cpu"))
    assert 256 << 20 <= budget < 1 << 50
    assert math.isfinite(budget)
