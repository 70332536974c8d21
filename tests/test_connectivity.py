"""block_connectivity against a brute-force path search, and its argument checks."""

import itertools

import pytest
import torch

import pixelfly_lab as pl
from pixelfly_lab.structure.connectivity import block_connectivity


def brute_force_fraction(layouts, depth):
    """Share of (i, j) with a path j -> ... -> i taking one kept block per layer, by explicit enumeration."""
    n = layouts[0].shape[0]
    linked = 0
    for i, j in itertools.product(range(n), range(n)):
        frontier = {j}  # blocks reachable from input block j after t layers
        for t in range(depth):
            layer = layouts[t % len(layouts)]
            frontier = {r for r in range(n) for c in frontier if bool(layer[r, c])}
        linked += i in frontier
    return linked / n ** 2


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_on_random_layouts(seed):
    generator = torch.Generator().manual_seed(seed)
    n = 5 + seed
    layouts = [torch.rand(n, n, generator=generator) < 0.2 for _ in range(1 + seed % 3)]
    table = block_connectivity(layouts if seed else layouts[0], hops=(1, 2, 3, 5))
    assert list(table.columns) == ["hops", "linked_fraction"]
    assert table["hops"].tolist() == [1, 2, 3, 5]
    for depth, fraction in zip(table["hops"], table["linked_fraction"]):
        expected = brute_force_fraction(layouts if seed else layouts[:1], depth)
        assert fraction == pytest.approx(expected, abs=1e-12)


def test_list_order_matters_and_cycles():
    # Layer 1 moves block 0 to 1 only; layer 2 moves 1 to 2 only: the pair (2, 0) needs that order.
    first = torch.zeros(3, 3, dtype=torch.bool)
    first[1, 0] = True
    second = torch.zeros(3, 3, dtype=torch.bool)
    second[2, 1] = True
    assert block_connectivity([first, second], hops=2)["linked_fraction"].item() == pytest.approx(1 / 9)
    assert block_connectivity([second, first], hops=2)["linked_fraction"].item() == 0.0
    assert block_connectivity([first, second], hops=3)["linked_fraction"].item() == 0.0  # layer 3 = first again


def test_teaching_cases_block_diagonal_never_links_and_butterfly_spans():
    # The released layout at these sizes: 4 diagonal groups, linked share stays 1/4 however deep.
    groups = pl.flat_block_butterfly_layout(256, 256, butterfly_size=16, n_factors=2, block_size=16)
    assert block_connectivity(groups, hops=(2, 8))["linked_fraction"].tolist() == [0.25, 0.25]
    # Strides spanning the grid: everything linked within log2(n) hops.
    full = pl.flat_butterfly_mask(16, 4)
    table = block_connectivity(full, hops=(3, 4))
    assert table["linked_fraction"].tolist()[1] == 1.0 and table["linked_fraction"].tolist()[0] < 1.0
    assert "block_connectivity" in pl.__all__ and pl.block_connectivity is block_connectivity


def test_bad_arguments_name_themselves():
    eye = torch.eye(4, dtype=torch.bool)
    with pytest.raises(ValueError, match="layouts"):
        block_connectivity(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="layouts"):
        block_connectivity(torch.ones(3, 3))
    with pytest.raises(ValueError, match="layouts"):
        block_connectivity([eye, torch.eye(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="layouts"):
        block_connectivity([])
    with pytest.raises(ValueError, match="hops"):
        block_connectivity(eye, hops=0)
    with pytest.raises(ValueError, match="hops"):
        block_connectivity(eye, hops=())
    with pytest.raises(TypeError, match="hops"):
        block_connectivity(eye, hops=(1.5,))
