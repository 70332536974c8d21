"""PixelflyLinear's gating= and lowrank_init= options: the gated mix against its explicit formula
(values and gradients), the kaiming init of the low-rank factors, and the plumbing to layers."""

import pytest
import torch

from pixelfly_lab.nn.layers import (LOWRANK_INITS, LowRankLinear, PixelflyLinear, SparseLowRankLinear,
                                 layer_from_pattern)
from pixelfly_lab.structure.patterns import make_pattern

F64 = torch.float64


def _explicit_gated(layer, x):
    """y = (1 - g) S x + g U V^T x + b, g = sigmoid(w^T x + c): the released layer's formula."""
    g = torch.sigmoid(x @ layer.gate.weight.T + layer.gate.bias)
    sparse = x @ layer.sparse.dense_weight().T
    low = x @ (layer.lowrank.u @ layer.lowrank.v.T).T
    return (1 - g) * sparse + g * low + layer.bias


@pytest.mark.parametrize("lowrank_init", LOWRANK_INITS)
def test_gated_layer_equals_the_explicit_formula_values_and_gradients(lowrank_init):
    torch.manual_seed(0)
    layer = PixelflyLinear(32, 64, butterfly_size=8, n_factors=2, rank=3, block_size=4, gating=True,
                           lowrank_init=lowrank_init, dtype=F64)
    x = torch.randn(6, 32, dtype=F64, requires_grad=True)
    probe = torch.randn(6, 64, dtype=F64)
    params = [x] + list(layer.parameters())
    got = torch.autograd.grad((layer(x) * probe).sum(), params)
    want = torch.autograd.grad((_explicit_gated(layer, x) * probe).sum(), params)
    torch.testing.assert_close(layer(x), _explicit_gated(layer, x))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # the gate is input-dependent: no dense weight can express it
    with pytest.raises(RuntimeError, match="gate"):
        layer.dense_weight()
    assert layer.weight_params == layer.sparse.weight_params + 3 * (32 + 64)   # the gate is not budgeted


def test_kaiming_init_draws_the_factors_like_two_linear_layers():
    torch.manual_seed(0)
    in_f, out_f, rank = 512, 768, 64
    layer = LowRankLinear(in_f, out_f, rank, init="kaiming", dtype=F64)
    assert layer.v.abs().max() <= 1 / in_f ** 0.5 and layer.u.abs().max() <= 1 / rank ** 0.5
    # uniform on (-a, a) has variance a^2 / 3
    assert layer.v.var().item() == pytest.approx(1 / (3 * in_f), rel=0.05)
    assert layer.u.var().item() == pytest.approx(1 / (3 * rank), rel=0.05)
    # unlike the SVD init, the factors are not balanced (U^T U != V^T V)
    svd = LowRankLinear(in_f, out_f, rank, init="svd", dtype=F64)
    torch.testing.assert_close(svd.u.T @ svd.u, svd.v.T @ svd.v)
    assert not torch.allclose(layer.u.T @ layer.u, layer.v.T @ layer.v, rtol=0.1)
    layer.reset_parameters()   # re-draws with the same rule
    assert layer.u.abs().max() <= 1 / rank ** 0.5


def test_layer_from_pattern_passes_gating_and_lowrank_init():
    pixelfly = make_pattern("pixelfly", 64, 64, 0.4, block_size=4)
    layer = layer_from_pattern(pixelfly, gating=True, lowrank_init="kaiming")
    assert isinstance(layer, PixelflyLinear) and layer.gate is not None and layer.lowrank.init == "kaiming"
    plus = layer_from_pattern(make_pattern("random+lowrank", 64, 64, 0.4, block_size=4), gating=True)
    assert type(plus) is SparseLowRankLinear and plus.gate is not None and plus.lowrank.init == "svd"
    low = layer_from_pattern(make_pattern("lowrank", 64, 64, 0.4), lowrank_init="kaiming")
    assert isinstance(low, LowRankLinear) and low.init == "kaiming"
    default = layer_from_pattern(pixelfly)
    assert default.gate is None and default.lowrank.init == "svd"


@pytest.mark.parametrize("kwargs, error, word", [
    (dict(lowrank_init="orthogonal"), ValueError, "lowrank_init"),
    (dict(gating="yes"), TypeError, "gating"),
])
def test_bad_options_are_named(kwargs, error, word):
    with pytest.raises(error, match=word):
        PixelflyLinear(32, 32, butterfly_size=4, n_factors=2, rank=2, block_size=4, **kwargs)
    with pytest.raises(error, match=word):
        layer_from_pattern(make_pattern("pixelfly", 32, 32, 0.5, block_size=4), **kwargs)
    with pytest.raises(ValueError, match="init"):
        LowRankLinear(8, 8, 2, init="orthogonal")



def test_build_model_passes_gating_and_lowrank_init_to_every_pixelfly_layer():
    from pixelfly_lab.training.data import make_teacher
    from pixelfly_lab.training.models import build_model

    data = make_teacher(n_train=16, n_test=8, d_in=32, d_out=3)
    model = build_model("mlp", data, pattern="pixelfly", budget=0.4, block_size=4, gating=True,
                        lowrank_init="kaiming", dim=64)
    pixelfly = [m for m in model.modules() if isinstance(m, PixelflyLinear)]
    assert pixelfly and all(m.gate is not None for m in pixelfly)
    assert all(m.lowrank is None or m.lowrank.init == "kaiming" for m in pixelfly)
    plain = build_model("mlp", data, pattern="pixelfly", budget=0.4, block_size=4, dim=64)
    assert all(m.gate is None for m in plain.modules() if isinstance(m, PixelflyLinear))
    with pytest.raises(ValueError, match="lowrank_init"):
        build_model("mlp", data, pattern="pixelfly", budget=0.4, block_size=4, lowrank_init="zeros")


def test_sparse_lowrank_projection_fits_its_parts_through_their_fit():
    """project_ of S + U V^T: U V^T = the low-rank part's own fit of W0 off the support, S = the sparse
    part's own fit of W0 - U V^T; each part's fit_ returns work - W; every part's init_scale is reset."""
    torch.manual_seed(0)
    layer = PixelflyLinear(32, 64, butterfly_size=4, n_factors=1, rank=3, block_size=8, dtype=F64)
    layer.match_(0.5)
    w0 = torch.randn(64, 32, dtype=F64)
    torch.manual_seed(1)
    error = layer.project_(w0)
    assert layer.sparse.init_scale == layer.lowrank.init_scale == layer.init_scale == 1.0
    on = layer.sparse.mask()
    low = LowRankLinear(32, 64, 3, dtype=F64)
    torch.manual_seed(1)
    with torch.no_grad():
        residual = low.fit_(w0 * ~on)                                # the same randomised SVD draws
    torch.testing.assert_close(residual, w0 * ~on - low.dense_weight(), rtol=0, atol=1e-14)
    torch.testing.assert_close(layer.lowrank.dense_weight(), low.dense_weight(), rtol=0, atol=0)
    torch.testing.assert_close(layer.sparse.dense_weight(), (w0 - low.dense_weight()) * on, rtol=0, atol=1e-14)
    assert error == pytest.approx(float(torch.linalg.norm((w0 - layer.dense_weight()) * ~on) / torch.linalg.norm(w0)))
