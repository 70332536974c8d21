"""Butterfly supports against brute-force oracles written element by element from the definitions
in :mod:`pixelfly_lab.structure.masks` (Pixelfly paper, Sec. 3; the authors' released layout code)."""

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pixelfly_lab.structure.masks import (
    block_butterfly_mask,
    butterfly_factor_mask,
    butterfly_product_mask,
    flat_block_butterfly_layout,
    flat_butterfly_mask,
    layout_to_mask,
    mask_to_layout,
)

log_sizes = st.integers(min_value=1, max_value=7)  # n = 2 .. 128


def oracle_layout(out_f, in_f, size, n_factors, block, shuffle, global_size):
    """The five steps of :func:`~pixelfly_lab.structure.masks.flat_block_butterfly_layout`, element by element."""
    groups = size >> n_factors
    row_cell, col_cell = out_f // size, in_f // size
    layout = torch.zeros(out_f // block, in_f // block, dtype=torch.bool)
    for r, c in itertools.product(range(out_f), range(in_f)):
        i, j = r // row_cell, c // col_cell
        if shuffle:  # shuffled column j = (c', g) holds original column (g, c')
            j = (j % groups) * (1 << n_factors) + j // groups
        x = i ^ j
        kept = x == 0 or (x & (x - 1) == 0 and x < (1 << n_factors))
        if kept or r < global_size or c < global_size:
            layout[r // block, c // block] = True
    return layout


@given(log_n=log_sizes, data=st.data())
def test_factor_support_is_xor_in_zero_or_stride(log_n, data):
    n = 1 << log_n
    stride = 1 << data.draw(st.integers(0, log_n - 1))
    mask = butterfly_factor_mask(n, stride)
    assert mask.dtype == torch.bool and mask.shape == (n, n)
    expected = torch.tensor([[(r ^ c) in (0, stride) for c in range(n)] for r in range(n)])
    assert torch.equal(mask, expected)


@given(log_n=log_sizes, data=st.data())
def test_flat_support_is_union_of_factors(log_n, data):
    n = 1 << log_n
    n_factors = data.draw(st.integers(1, log_n))
    flat = flat_butterfly_mask(n, n_factors)
    union = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n_factors):
        union |= butterfly_factor_mask(n, 1 << i)
    assert torch.equal(flat, union)
    assert torch.equal(flat, flat.T)
    assert (flat.sum(1) == 1 + n_factors).all() and (flat.sum(0) == 1 + n_factors).all()
    assert flat.float().mean().item() == pytest.approx((1 + n_factors) / n)


@given(log_n=log_sizes, data=st.data())
def test_product_support_is_support_of_the_matrix_product(log_n, data):
    n = 1 << log_n
    n_factors = data.draw(st.integers(1, log_n))
    product = torch.eye(n, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for i in range(n_factors):  # B_{2^n_factors} ... B_2 with positive random entries: no cancellation
        factor = butterfly_factor_mask(n, 1 << i) * (torch.rand(n, n, generator=generator, dtype=torch.float64) + 0.5)
        product = factor @ product
    assert torch.equal(butterfly_product_mask(n, n_factors), product != 0)
    assert butterfly_product_mask(n).all()  # the full butterfly matrix is dense


@given(log_n=st.integers(1, 5), block=st.integers(1, 4), data=st.data())
def test_block_butterfly_is_kron_of_support(log_n, block, data):
    n = 1 << log_n
    n_factors = data.draw(st.integers(1, log_n))
    support = flat_butterfly_mask(n, n_factors)
    expected = torch.kron(support.int(), torch.ones(block, block, dtype=torch.int)).bool()
    assert torch.equal(block_butterfly_mask(n, n_factors, block), expected)
    assert torch.equal(mask_to_layout(expected, block), support)


@given(data=st.data())
def test_flat_block_layout_matches_elementwise_oracle(data):
    log_size = data.draw(st.integers(1, 3))
    size = 1 << log_size
    n_factors = data.draw(st.integers(1, log_size))
    block = data.draw(st.sampled_from([1, 2, 4]))
    out_f = size * data.draw(st.sampled_from([1, 2, 4])) * block // min(block, 2)
    in_f = size * data.draw(st.sampled_from([1, 2, 4])) * block // min(block, 2)
    if out_f % block or in_f % block:
        return
    shuffle = data.draw(st.booleans())
    global_size = data.draw(st.integers(0, min(out_f, in_f) // 2))
    layout = flat_block_butterfly_layout(out_f, in_f, size, n_factors, block, shuffle, global_size)
    assert layout.dtype == torch.bool and layout.shape == (out_f // block, in_f // block)
    assert torch.equal(layout, oracle_layout(out_f, in_f, size, n_factors, block, shuffle, global_size))


@given(data=st.data())
def test_unshuffled_layout_is_block_diagonal_in_groups(data):
    log_size = data.draw(st.integers(2, 5))
    size = 1 << log_size
    n_factors = data.draw(st.integers(1, log_size - 1))
    out_f, in_f = size * data.draw(st.sampled_from([2, 4])), size * data.draw(st.sampled_from([1, 2]))
    block = data.draw(st.sampled_from([1, 2]))
    layout = flat_block_butterfly_layout(out_f, in_f, size, n_factors, block)
    groups = size >> n_factors
    gr, gc = layout.shape[0] // groups, layout.shape[1] // groups
    diagonal = torch.block_diag(*[torch.ones(gr, gc, dtype=torch.bool)] * groups)
    assert not (layout & ~diagonal).any(), "support outside the diagonal groups"
    # each group holds the same flat butterfly of 2^n_factors cells
    first = layout[:gr, :gc]
    for g in range(groups):
        assert torch.equal(layout[g * gr:(g + 1) * gr, g * gc:(g + 1) * gc], first)


def test_released_configuration_density():
    layout = flat_block_butterfly_layout(4096, 1024, 16, 2, 32)
    assert layout.shape == (128, 32)
    assert layout.float().mean().item() == pytest.approx(3 / 16)
    assert (layout.sum(1) == layout.sum(1)[0]).all(), "every block row has the same fan-in"


def test_layout_to_mask_round_trip():
    layout = torch.tensor([[True, False], [False, True]])
    mask = layout_to_mask(layout, 3)
    assert mask.shape == (6, 6) and int(mask.sum()) == 18
    assert torch.equal(mask_to_layout(mask, 3), layout)


@pytest.mark.parametrize("call, word", [
    (lambda: butterfly_factor_mask(6, 1), "n"),
    (lambda: butterfly_factor_mask(8, 3), "stride"),
    (lambda: butterfly_factor_mask(8, 8), "stride"),
    (lambda: flat_butterfly_mask(8, 0), "n_factors"),
    (lambda: flat_butterfly_mask(8, 4), "n_factors"),
    (lambda: flat_block_butterfly_layout(100, 64, 16, 2, 4), "out_features"),
    (lambda: flat_block_butterfly_layout(64, 64, 12, 2, 4), "butterfly_size"),
    (lambda: flat_block_butterfly_layout(64, 64, 16, 5, 4), "n_factors"),
    (lambda: flat_block_butterfly_layout(64, 48, 16, 2, 32), "in_features"),
    (lambda: flat_block_butterfly_layout(64, 64, 16, 2, 4, global_size=65), "global_size"),
    (lambda: layout_to_mask(torch.ones(3, dtype=torch.bool), 2), "layout"),
])
def test_bad_input_names_the_argument(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_wrong_type_is_a_type_error():
    with pytest.raises(TypeError, match="n"):
        flat_butterfly_mask(8.0, 1)
