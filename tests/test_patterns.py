"""Patterns stay within their budget, use it, are reproducible; the Pixelfly plan follows its rule."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pixelfly_lab.structure.masks import flat_block_butterfly_layout
from pixelfly_lab.structure.patterns import (
    LOWRANK_SHARE,
    MIN_RANK,
    PATTERN_NAMES,
    make_pattern,
    monarch_params,
    plan_pixelfly,
)

shapes = st.sampled_from([(64, 64), (128, 64), (64, 256), (256, 256), (512, 128)])
budgets = st.floats(min_value=0.02, max_value=1.0)
block_sizes = st.sampled_from([1, 4, 8, 16])


def build_or_skip(name, out_f, in_f, budget, block, seed=0):
    """The pattern, or None when the budget is below the pattern's smallest instance (a clear error)."""
    try:
        return make_pattern(name, out_f, in_f, budget, block_size=block, seed=seed)
    except ValueError as err:
        assert "too small" in str(err)
        return None


@given(name=st.sampled_from([n for n in PATTERN_NAMES if n != "dense"]), shape=shapes, budget=budgets,
       block=block_sizes, seed=st.integers(0, 3))
def test_every_pattern_stays_within_its_budget(name, shape, budget, block, seed):
    out_f, in_f = shape
    pattern = build_or_skip(name, out_f, in_f, budget, block, seed)
    if pattern is None:
        return
    assert pattern.params <= budget * in_f * out_f + 1e-6
    assert pattern.budget <= budget + 1e-12
    if pattern.layout is not None:
        assert pattern.layout.dtype == torch.bool
        assert pattern.layout.shape == (out_f // block, in_f // block)
        assert pattern.mask().shape == (out_f, in_f)


@given(name=st.sampled_from(["random", "local", "global", "bigbird", "strided"]), shape=shapes,
       budget=budgets, block=block_sizes)
def test_block_patterns_use_the_whole_budget(name, shape, budget, block):
    out_f, in_f = shape
    pattern = build_or_skip(name, out_f, in_f, budget, block)
    if pattern is None:
        return
    assert int(pattern.layout.sum()) == int(budget * in_f * out_f // block ** 2)


@given(name=st.sampled_from(["random", "bigbird"]), budget=st.floats(0.1, 0.6), seed=st.integers(0, 100))
def test_seeded_patterns_are_reproducible_and_seeds_differ(name, budget, seed):
    a = make_pattern(name, 256, 256, budget, block_size=8, seed=seed)
    b = make_pattern(name, 256, 256, budget, block_size=8, seed=seed)
    c = make_pattern(name, 256, 256, budget, block_size=8, seed=seed + 1)
    assert torch.equal(a.layout, b.layout)
    assert not torch.equal(a.layout, c.layout)


def test_local_is_a_band_and_global_is_rows_and_columns():
    local = make_pattern("local", 64, 64, 3 / 8, block_size=8).layout  # 24 of 64 blocks
    assert local.diagonal().all() and not local[0, -1]
    glob = make_pattern("global", 64, 64, 15 / 64, block_size=8).layout  # 15 = first row + first column
    assert glob[0].all() and glob[:, 0].all() and int(glob.sum()) == 15


def test_blockdiag_and_lowrank_and_monarch():
    bd = make_pattern("blockdiag", 64, 64, 0.25, block_size=8)
    assert torch.equal(bd.layout, torch.block_diag(*[torch.ones(2, 2, dtype=torch.bool)] * 4))
    lr = make_pattern("lowrank", 64, 128, 0.25)
    assert lr.rank == int(0.25 * 64 * 128 // 192) and lr.layout is None
    mo = make_pattern("monarch", 64, 64, 0.25)
    assert mo.nblocks == 8 and mo.params == monarch_params(64, 64, 8) == 2 * 64 * 64 // 8


@pytest.mark.parametrize("out_f, in_f", [(4096, 1024), (1024, 4096), (256, 256), (64, 256)])
def test_monarch_params_follow_the_authors_layer(out_f, in_f):
    # the authors' MonarchLinear: (in^2 + out*in)/nb when in < out, (out*in + out^2)/nb when in >= out
    for nb in (2, 4, 8):
        authors = (in_f ** 2 + out_f * in_f) if in_f < out_f else (out_f * in_f + out_f ** 2)
        assert monarch_params(out_f, in_f, nb) == authors // nb
    pattern = make_pattern("monarch", out_f, in_f, 0.25)
    assert pattern.budget <= 0.25
    assert monarch_params(out_f, in_f, pattern.nblocks) == pattern.params
    # the fewest blocks that fit: half as many blocks would not
    half = pattern.nblocks // 2
    assert half == 0 or monarch_params(out_f, in_f, half) > 0.25 * out_f * in_f


def plan_or_skip(out_f, in_f, budget, block):
    """(plan, its layout), or (None, None) when the budget is below the sparsest layout (a clear error)."""
    try:
        plan = plan_pixelfly(out_f, in_f, budget, block)
    except ValueError as err:
        assert "too small" in str(err)
        return None, None
    return plan, flat_block_butterfly_layout(out_f, in_f, plan.butterfly_size, plan.n_factors, block)


@given(shape=shapes, budget=budgets, block=block_sizes)
def test_plan_never_exceeds_and_fills_the_budget(shape, budget, block):
    out_f, in_f = shape
    plan, layout = plan_or_skip(out_f, in_f, budget, block)
    if plan is None:
        return
    used = int(layout.sum()) * block ** 2 + plan.rank * (in_f + out_f)
    assert used / (in_f * out_f) == pytest.approx(plan.budget)
    assert used <= budget * in_f * out_f + 1e-6
    # nothing is left that one more rank could use (unless the rank is already full)
    assert plan.rank == min(in_f, out_f) or budget * in_f * out_f - used < in_f + out_f


def test_plan_gives_the_released_configuration():
    for out_f, in_f in [(4096, 1024), (1024, 4096)]:
        plan = plan_pixelfly(out_f, in_f, 0.2266, block_size=32)
        assert (plan.butterfly_size, plan.n_factors, plan.block_size, plan.rank) == (16, 2, 32, 32)
        pattern = make_pattern("pixelfly", out_f, in_f, 0.2266, block_size=32)
        assert pattern.rank == 32 and pattern.budget == pytest.approx(plan.budget)


def _one_factor_layouts(out_f, in_f, block):
    """Every flat block butterfly layout with one factor (block diagonals), as bytes."""
    layouts, size = set(), 2
    while out_f % size == 0 and in_f % size == 0:
        layouts.add(flat_block_butterfly_layout(out_f, in_f, size, 1, block).numpy().tobytes())
        size *= 2
    return layouts


def _several_factor_nnz(out_f, in_f, block):
    """nnz of every layout with >= 2 factors that is not also a one-factor layout after coarsening."""
    one, nnz, size = _one_factor_layouts(out_f, in_f, block), [], 4
    while out_f % size == 0 and in_f % size == 0:
        for k in range(2, size.bit_length()):
            layout = flat_block_butterfly_layout(out_f, in_f, size, k, block)
            if layout.numpy().tobytes() not in one:
                nnz.append(int(layout.sum()) * block ** 2)
        size *= 2
    return nnz


@settings(max_examples=60, deadline=None)
@given(shape=shapes, budget=budgets, block=block_sizes)
def test_plan_has_two_factors_wherever_a_two_factor_layout_fits(shape, budget, block):
    out_f, in_f = shape
    plan, layout = plan_or_skip(out_f, in_f, budget, block)
    if plan is None:
        return
    assert plan.budget <= budget + 1e-12
    if any(nnz <= budget * in_f * out_f for nnz in _several_factor_nnz(out_f, in_f, block)):
        assert plan.n_factors >= 2
        assert layout.numpy().tobytes() not in _one_factor_layouts(out_f, in_f, block)
    else:   # only a block diagonal fits: the plan says so
        assert plan.n_factors == 1


def test_plan_prefers_the_faster_layout_among_near_equal_plans():
    # at budget 0.2 the densest layout leaving rank 8 is (32, 4) (0.156); (16, 2) (0.1875) also
    # fits the budget with rank 10 and ran faster (issue 16), so the plan takes it
    plan = plan_pixelfly(4096, 1024, 0.2, block_size=32)
    assert (plan.butterfly_size, plan.n_factors, plan.rank) == (16, 2, 10)
    assert plan.budget <= 0.2


@pytest.mark.parametrize("n, block", [(128, 4), (256, 4), (256, 8), (256, 16)])
def test_plan_gives_a_useful_rank_at_small_widths(n, block):
    # the previous rule (15% of the budget) gave rank 1-4 here
    for budget in (0.25, 0.3):
        plan = plan_pixelfly(n, n, budget, block)
        assert plan.rank >= min(MIN_RANK, int(0.5 * budget * n * n // (2 * n)))
        assert plan.n_factors >= 2


@pytest.mark.parametrize("out_f, in_f, block", [(256, 256, 8), (256, 256, 16), (4096, 1024, 32),
                                                (1024, 4096, 32)])
def test_butterfly_is_not_the_block_diagonal_at_budget_one_quarter(out_f, in_f, block):
    butterfly = make_pattern("butterfly", out_f, in_f, 0.25, block_size=block)
    blockdiag = make_pattern("blockdiag", out_f, in_f, 0.25, block_size=block)
    assert butterfly.budget <= 0.25 and butterfly.plan.n_factors >= 2
    assert not torch.equal(butterfly.layout, blockdiag.layout)


def test_plus_lowrank_reserves_the_lowrank_share():
    p = make_pattern("random+lowrank", 256, 256, 0.3, block_size=8)
    sparse_share = p.sparse_params / (256 * 256 * 0.3)
    assert sparse_share <= 1 - LOWRANK_SHARE + 1e-9 and p.rank >= 1


@pytest.mark.parametrize("kwargs, word", [
    (dict(name="pixelfy"), "pixelfly"),  # unknown name: the message lists the known ones
    (dict(budget=0.0), "budget"),
    (dict(budget=1.5), "budget"),
    (dict(budget=float("nan")), "budget"),
    (dict(out_features=100), "out_features"),
    (dict(in_features=72, block_size=16), "in_features"),
])
def test_bad_input_names_the_argument(kwargs, word):
    args = dict(name="pixelfly", out_features=128, in_features=64, budget=0.3, block_size=8) | kwargs
    with pytest.raises(ValueError, match=word):
        make_pattern(args.pop("name"), **args)


def test_budget_too_small_says_the_minimum():
    with pytest.raises(ValueError, match="budget >="):
        plan_pixelfly(3072, 768, 0.05, block_size=32)
    with pytest.raises(TypeError, match="budget"):
        plan_pixelfly(64, 64, "0.5", block_size=8)
