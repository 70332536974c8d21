"""ButterflyLinear against exact oracles: Hadamard, DFT, factor supports, the residual gap."""

import math

import pytest
import torch

from pixelfly_lab.nn.butterfly import ButterflyLinear, bit_reversal_permutation
from pixelfly_lab.structure.masks import butterfly_factor_mask, butterfly_product_mask, flat_butterfly_mask

F64 = torch.float64


def sylvester(n):
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("n", [2, 4, 16, 64])
def test_hadamard_equals_sylvester(n):
    layer = ButterflyLinear.from_transform("hadamard", n, dtype=F64)
    torch.testing.assert_close(layer.dense_weight().detach(), sylvester(n), rtol=0, atol=0)
    x = torch.randn(3, n, dtype=F64)
    torch.testing.assert_close(layer(x), x @ sylvester(n).T)


@pytest.mark.parametrize("n", [2, 8, 32])
def test_dft_equals_the_dft_matrix_and_fft(n):
    layer = ButterflyLinear.from_transform("dft", n, dtype=F64)
    r = torch.arange(n, dtype=F64)
    dft = torch.exp(-2j * math.pi * torch.outer(r, r) / n)
    torch.testing.assert_close(layer.dense_weight().detach(), dft, rtol=1e-12, atol=1e-12)
    x = torch.randn(4, n, dtype=F64)
    torch.testing.assert_close(layer(x).detach(), torch.fft.fft(x.to(torch.complex128)), rtol=1e-12, atol=1e-12)


def test_bit_reversal_is_an_involution():
    perm = bit_reversal_permutation(16)
    assert perm[1] == 8 and perm[3] == 12
    assert torch.equal(perm[perm], torch.arange(16))


@pytest.mark.parametrize("n_factors", [1, 2, 4])
def test_factor_supports_and_product_support(n_factors):
    torch.manual_seed(0)
    layer = ButterflyLinear(16, n_factors, dtype=F64)
    for f, factor in enumerate(layer.factor_matrices()):
        assert torch.equal(factor != 0, butterfly_factor_mask(16, 1 << f))
    support = layer.dense_weight() != 0
    assert not (support & ~butterfly_product_mask(16, n_factors)).any()


@pytest.mark.parametrize("kwargs", [{}, {"complex": True}, {"residual": True, "lam": 0.3},
                                    {"n_factors": 2, "bias": True}])
def test_forward_matches_dense_weight_values_and_gradients(kwargs):
    torch.manual_seed(1)
    layer = ButterflyLinear(8, dtype=F64, **kwargs)
    x = torch.randn(2, 3, 8, dtype=F64, requires_grad=True)
    y = layer(x)
    bias = 0 if layer.bias is None else layer.bias
    y_ref = x.to(y.dtype) @ layer.dense_weight().T + bias
    torch.testing.assert_close(y, y_ref)
    probe = torch.randn_like(y)
    g = torch.autograd.grad((y * probe.conj()).real.sum(), [x, layer.twiddle])
    g_ref = torch.autograd.grad((y_ref * probe.conj()).real.sum(), [x, layer.twiddle])
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want)


def test_gradcheck():
    torch.manual_seed(2)
    layer = ButterflyLinear(4, residual=True, lam=0.5, dtype=F64)
    x = torch.randn(2, 4, dtype=F64, requires_grad=True)

    def f(x, twiddle):
        return torch.func.functional_call(layer, {"twiddle": twiddle}, (x,))
    assert torch.autograd.gradcheck(f, (x, layer.twiddle.detach().clone().requires_grad_()))


def test_residual_gap_to_flat_butterfly_is_second_order():
    torch.manual_seed(3)
    layer = ButterflyLinear(32, 3, residual=True, dtype=F64)
    assert torch.equal(layer.flat_dense_weight() != 0, flat_butterfly_mask(32, 3))
    gaps = []
    for lam in (1e-2, 5e-3):
        layer.lam = lam
        gaps.append(torch.linalg.norm(layer.dense_weight() - layer.flat_dense_weight()).item())
    assert gaps[1] / gaps[0] == pytest.approx(0.25, rel=0.02)  # O(lam^2): halving lam quarters the gap


def test_complex_layer_stays_complex_under_to_dtype_and_round_trips():
    layer = ButterflyLinear.from_transform("dft", 8).to(F64)
    assert layer.dense_weight().dtype == torch.complex128
    clone = ButterflyLinear(8, complex=True, dtype=F64)
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone.dense_weight(), layer.dense_weight())


def test_counts_and_errors():
    layer = ButterflyLinear(16, 2)
    assert layer.weight_params == 2 * 8 * 4 and layer.budget == 64 / 256
    assert "n_factors=2" in repr(layer)
    with pytest.raises(ValueError, match="in_features=16"):
        layer(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="n_factors"):
        ButterflyLinear(16, 5)
    with pytest.raises(ValueError, match="power of two"):
        ButterflyLinear(12)
    with pytest.raises(ValueError, match="kind"):
        ButterflyLinear.from_transform("dct", 8)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_the_one_factor_rescale_rule(k):
    """scale_factors_ (every product layer's rescale): each of k factors times c^(1/k), the product
    times c; c = 0 zeroes the first factor only. A butterfly of k factors follows it."""
    from pixelfly_lab.nn.base import scale_factors_
    factors = [torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(i)) for i in range(k)]
    product = torch.linalg.multi_dot(factors) if k > 1 else factors[0]
    scaled = [f.clone() for f in factors]
    scale_factors_(scaled, 0.3)
    for before, after in zip(factors, scaled):
        torch.testing.assert_close(after, before * 0.3 ** (1 / k), rtol=1e-15, atol=0)
    torch.testing.assert_close(torch.linalg.multi_dot(scaled) if k > 1 else scaled[0], 0.3 * product)
    zeroed = [f.clone() for f in factors]
    scale_factors_(zeroed, 0.0)
    assert torch.all(zeroed[0] == 0) and all(torch.equal(a, b) for a, b in zip(zeroed[1:], factors[1:]))
    layer = ButterflyLinear(8, n_factors=k, dtype=F64)
    twiddle = layer.twiddle.detach().clone()
    layer.rescale_(0.0)
    assert torch.all(layer.twiddle[0] == 0) and torch.equal(layer.twiddle[1:], twiddle[1:])
