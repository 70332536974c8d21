"""Sparsity patterns at a parameter budget, and the Pixelfly budget -> hyper-parameter plan.

A :class:`Pattern` is what a layer needs to know about its weight's structure: a block layout
(which (block_size x block_size) blocks of the (out, in) weight are stored), a low-rank rank,
or a Monarch block count, plus the exact budget it uses:

    budget = (nnz(S) + rank * (in + out) + monarch parameters) / (in * out)

i.e. the fraction of a dense layer's parameters (= its matmul FLOPs). Every pattern built by
:func:`make_pattern` stays within the budget it is given; deterministic baselines take *exactly*
the largest number of blocks the budget allows, ranked by a per-block score.

Baselines follow the papers they come from: local (banded) and global attention (Longformer,
Beltagy et al. 2020), BigBird = local + global + random (Zaheer et al. 2020), strided (Sparse
Transformer, Child et al. 2019), Monarch (Dao et al. 2022), and the sparse + low-rank
combination of Scatterbrain (Chen et al. 2021) and Pixelfly (Dao, Chen et al. 2022).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch

from pixelfly_lab._checks import check_budget, check_int
from pixelfly_lab.structure.masks import flat_block_butterfly_layout, layout_to_mask, on_host

__all__ = ["Pattern", "PixelflyPlan", "PATTERN_NAMES", "LOWRANK_SHARE", "MIN_RANK", "make_pattern",
           "plan_pixelfly", "monarch_params", "butterfly_candidates", "check_budget"]

# Share of a sparse + low-rank budget reserved for the low-rank term of the 'X+lowrank' baselines
# before their sparse part is chosen. 0.15 is what the released Pixelfly configuration spends on
# it: at 1024 -> 4096, (butterfly_size 16, n_factors 2) uses 0.1875 of the weight and rank 32
# another 0.039 (17%). The rank then fills whatever the block granularity leaves over.
LOWRANK_SHARE = 0.15

# plan_pixelfly's low-rank floor: the plan keeps at least this rank (or what half the budget
# buys, if less) before choosing its sparse layout. A fixed share of the budget gave rank 1-2 at
# widths 64-256 (15% of 0.25 * 64 * 64 parameters is 1.2 ranks of 64 + 64); 8 is the smallest
# rank that captured most of the low-rank energy of the attention-like targets of the
# expressiveness study at n = 64..256, and at 1024 <-> 4096 it leaves the released
# configuration (rank 32) unchanged.
MIN_RANK = 8
# plan_pixelfly's "near-equal" tolerance: layouts storing at least this fraction of the densest
# admissible layout's entries count as equal, and the fastest of them is taken (the rank fills
# the difference, so every candidate uses the same total budget). At budget 0.2 and 4096x1024
# this picks (16, 2) over the denser-by-nothing (32, 4): measured on one thread, (32, 4) ran
# 2.6x faster than dense and (16, 2) 3.1x (issue 16).
NEAR_EQUAL_SPARSE = 0.8

_SPARSE_NAMES = ("random", "local", "global", "bigbird", "strided", "blockdiag", "butterfly")
PATTERN_NAMES = (("dense", "lowrank") + _SPARSE_NAMES + ("pixelfly", "monarch")
                 + tuple(f"{name}+lowrank" for name in _SPARSE_NAMES if name != "butterfly"))


@dataclass(frozen=True)
class PixelflyPlan:
    """Hyper-parameters of a Pixelfly layer and the budget they use (<= the budget asked)."""

    butterfly_size: int
    n_factors: int
    block_size: int
    rank: int
    budget: float  # exact fraction of the dense parameters used, low-rank included


@dataclass(frozen=True, eq=False)
class Pattern:
    """The structure of one (out_features, in_features) weight.

    Attributes:
        name: pattern name as given to :func:`make_pattern`.
        layout: bool (out_features / block_size, in_features / block_size) of stored blocks, or
            None when there is no sparse part ('lowrank', 'monarch'); all True for 'dense'.
        rank: rank of the low-rank term U V^T (0 = none).
        nblocks: Monarch block count (0 = not Monarch).
        plan: the Pixelfly plan for 'pixelfly' and 'butterfly', else None.
    """

    name: str
    out_features: int
    in_features: int
    block_size: int
    layout: torch.Tensor | None = None
    rank: int = 0
    nblocks: int = 0
    plan: PixelflyPlan | None = None
    requested_budget: float = field(default=1.0)

    @property
    def sparse_params(self) -> int:
        """Stored entries of the sparse part: nnz blocks * block_size^2."""
        return 0 if self.layout is None else int(self.layout.sum()) * self.block_size ** 2

    @property
    def params(self) -> int:
        """Weight parameters (no bias): sparse + low-rank + Monarch."""
        lowrank = self.rank * (self.in_features + self.out_features)
        monarch = monarch_params(self.out_features, self.in_features, self.nblocks) if self.nblocks else 0
        return self.sparse_params + lowrank + monarch

    @property
    def budget(self) -> float:
        """Exact fraction of a dense layer's parameters used."""
        return self.params / (self.in_features * self.out_features)

    @property
    def is_dense(self) -> bool:
        return self.name == "dense"

    def mask(self) -> torch.Tensor | None:
        """bool (out_features, in_features) support of the sparse part, or None."""
        return None if self.layout is None else layout_to_mask(self.layout, self.block_size)

    def __repr__(self) -> str:
        parts = [f"{self.name!r}", f"{self.out_features}x{self.in_features}", f"block={self.block_size}"]
        if self.layout is not None:
            parts.append(f"blocks={int(self.layout.sum())}/{self.layout.numel()}")
        if self.rank:
            parts.append(f"rank={self.rank}")
        if self.nblocks:
            parts.append(f"nblocks={self.nblocks}")
        parts.append(f"budget={self.budget:.4f}")
        return f"Pattern({', '.join(parts)})"


def _check_shape(out_features, in_features, block_size) -> None:
    check_int("out_features", out_features)
    check_int("in_features", in_features)
    check_int("block_size", block_size)
    for name, size in (("out_features", out_features), ("in_features", in_features)):
        if size % block_size:
            raise ValueError(f"{name}={size} is not divisible by block_size={block_size}")


def monarch_params(out_features: int, in_features: int, nblocks: int) -> int:
    """Parameters of a Monarch weight M = P L P^T R with nblocks blocks in L and R.

    As the authors' MonarchLinear (Dao et al. 2022, released code): the middle width is
    mid = min(in, out), R is block-diagonal with nblocks (mid/nb x in/nb) blocks and L with
    nblocks (out/nb x mid/nb) blocks, so

        (in^2 + out * in) / nblocks    when in < out,
        (out * in + out^2) / nblocks   when in >= out,

    i.e. mid * (in + out) / nblocks. (A middle width of in when in > out would spend
    in^2 / nb on R, 4x the parameters of the authors' layer at 4096 -> 1024.)
    """
    for name, value in (("out_features", out_features), ("in_features", in_features), ("nblocks", nblocks)):
        check_int(name, value)
    return min(in_features, out_features) * (in_features + out_features) // nblocks


@functools.lru_cache(maxsize=256)
@on_host
def butterfly_candidates(out_features, in_features, block_size) -> tuple[tuple[int, int, int], ...]:
    """Every distinct flat block butterfly layout of the shape as (butterfly_size, n_factors, nnz).

    Coarsening to blocks can merge layouts: at 256x256 with block 32, (16, 2) keeps exactly the
    blocks of (8, 1), a block diagonal. Each distinct layout is named by its fewest factors,
    then its smallest butterfly_size, so n_factors is the number of factors the layout really
    has. Cached per shape because models repeat shapes and every candidate builds a layout.
    """
    named = []
    size = 2
    while out_features % size == 0 and in_features % size == 0:
        for n_factors in range(1, size.bit_length()):
            layout = flat_block_butterfly_layout(out_features, in_features, size, n_factors, block_size)
            named.append((n_factors, size, layout))
        size *= 2
    candidates, seen = [], set()
    for n_factors, size, layout in sorted(named, key=lambda c: (c[0], c[1])):
        key = layout.numpy().tobytes()
        if key not in seen:
            seen.add(key)
            candidates.append((size, n_factors, int(layout.sum()) * block_size ** 2))
    return tuple(candidates)


def _admissible(out_features, in_features, block_size, max_params):
    """Layouts with at most max_params entries; only those with >= 2 factors when any fits.

    One factor is a block diagonal (no released configuration uses it): it is taken only when
    no layout with two or more factors fits at all.
    """
    fits = [c for c in butterfly_candidates(out_features, in_features, block_size) if c[2] <= max_params]
    several = [c for c in fits if c[1] >= 2]
    return several or fits


def _best_butterfly(out_features, in_features, block_size, max_params):
    """The densest admissible flat block butterfly with at most max_params entries.

    Ties (equal nnz) go to fewer factors, then the smaller butterfly_size: fewer, larger dense
    rectangles per block row make faster GEMMs. Returns (butterfly_size, n_factors, nnz) or None.
    """
    fits = _admissible(out_features, in_features, block_size, max_params)
    return min(fits, key=lambda c: (-c[2], c[1], c[0]), default=None)


@on_host
def plan_pixelfly(out_features: int, in_features: int, budget: float, block_size: int = 32) -> PixelflyPlan:
    """Map a parameter budget to Pixelfly hyper-parameters (the paper's workflow, Figure 1).

    Rule, over every distinct flat block butterfly layout of the shape (every butterfly_size
    dividing both dimensions, every n_factors; layouts that coarsen to the same blocks counted
    once, under their fewest factors):

    1. Admissible layouts fit the budget alone; if any with n_factors >= 2 fits, only those.
       Why: n_factors = 1 is a block diagonal, which mixes no information across groups and
       appears in no released configuration.
    2. Keep a low-rank floor r0 = min(MIN_RANK, the rank half the budget buys): the admissible
       layouts that leave room for rank r0 are the candidates (if none does, the sparsest
       admissible layout). Why: a fixed share of the budget (15%, the previous rule) gave rank
       1-2 at widths 64-256, too little for the low-rank term to carry anything; a floor in
       ranks gives rank >= 4-8 there and is not binding at large widths.
    3. Near-equal plans go to the faster layout: among candidates storing at least
       NEAR_EQUAL_SPARSE (80%) of the densest candidate's entries, take the fewest factors,
       then the smallest butterfly_size (wider cells), then the most entries. Why: the rank fills
       what the layout leaves, so all of these use the same total budget; fewer factors mean
       fewer, larger GEMMs (issue 16: at 4096x1024, (32, 4) at budget 0.2 ran 2.6x faster than
       dense, (16, 2) at 0.227 3.1x), and the paper's ablation finds most of the accuracy in
       the sparse part, which loses at most 20% here.
    4. The rank fills all that is left: rank = floor((budget * in * out - nnz) / (in + out)),
       at most min(in, out). The plan therefore never exceeds the budget and leaves less than
       one rank's worth (in + out parameters) unused.

    This reproduces the released configuration (butterfly_size 16, n_factors 2, block 32,
    rank 32) at budget 0.2266 (= (0.1875 * 4096 * 1024 + 32 * 5120) / (4096 * 1024)) at
    1024 -> 4096 and 4096 -> 1024; at budget 0.2 it gives (16, 2) with rank 10, at 0.25
    (16, 2) with rank 51.

    Args:
        out_features, in_features: weight shape, divisible by ``block_size``.
        budget: fraction of dense parameters in (0, 1].
        block_size: hardware block edge; 32 matches the released code and GPU tiles.

    Returns:
        :class:`PixelflyPlan`.

    Raises:
        ValueError: when even the sparsest layout exceeds the budget (the message gives the
            smallest budget that works).

    Example:
        >>> plan_pixelfly(4096, 1024, 0.2266)
        PixelflyPlan(butterfly_size=16, n_factors=2, block_size=32, rank=32, budget=0.2265625)
    """
    budget = check_budget(budget)
    _check_shape(out_features, in_features, block_size)
    total = budget * in_features * out_features
    width = in_features + out_features
    admissible = _admissible(out_features, in_features, block_size, total)
    if not admissible:
        smallest = min(nnz for *_, nnz in butterfly_candidates(out_features, in_features, block_size))
        raise ValueError(
            f"budget={budget} is too small for a pixelfly layout of {out_features}x{in_features} at "
            f"block_size={block_size}; the sparsest needs budget >= {smallest / (in_features * out_features):.4f}"
        )
    floor = min(MIN_RANK, int(0.5 * total // width))
    candidates = [c for c in admissible if c[2] + floor * width <= total]
    if not candidates:
        candidates = [min(admissible, key=lambda c: (c[2], c[1], c[0]))]
    densest = max(nnz for *_, nnz in candidates)
    near = [c for c in candidates if c[2] >= NEAR_EQUAL_SPARSE * densest]
    size, n_factors, nnz = min(near, key=lambda c: (c[1], c[0], -c[2]))
    rank = min(int((total - nnz) // width), min(in_features, out_features))
    used = (nnz + rank * width) / (in_features * out_features)
    return PixelflyPlan(size, n_factors, block_size, rank, used)


def _take_best_blocks(score: torch.Tensor, k: int, chosen: torch.Tensor | None = None) -> torch.Tensor:
    """Layout with the k lowest-score blocks (ties broken by row-major index), added to chosen."""
    layout = torch.zeros_like(score, dtype=torch.bool) if chosen is None else chosen.clone()
    k_new = max(0, min(k - int(layout.sum()), int((~layout).sum())))
    if k_new:
        free_score = score.masked_fill(layout, float("inf")).flatten().double()
        # stable sort: equal scores keep row-major order, so layouts are deterministic
        order = torch.sort(free_score, stable=True).indices[:k_new]
        layout.view(-1)[order] = True
    return layout


def _block_grid(R: int, C: int):
    """Normalised block centres (i + 0.5)/R, (j + 0.5)/C as (R, 1) and (1, C) tensors."""
    rows = (torch.arange(R, dtype=torch.float64)[:, None] + 0.5) / R
    cols = (torch.arange(C, dtype=torch.float64)[None, :] + 0.5) / C
    return rows, cols


def _sparse_layout(name, R, C, k, seed):
    rows, cols = _block_grid(R, C)
    diagonal = (rows - cols).abs()                       # local: distance to the (stretched) diagonal
    border = torch.minimum(rows.expand(R, C), cols.expand(R, C))   # global: distance to top/left
    generator = torch.Generator().manual_seed(seed)
    random = torch.rand(R, C, generator=generator, dtype=torch.float64)
    if name == "random":
        return _take_best_blocks(random, k)
    if name == "local":
        return _take_best_blocks(diagonal, k)
    if name == "global":
        return _take_best_blocks(border, k)
    if name == "bigbird":  # a third each of local, global and random blocks (Zaheer et al. 2020)
        layout = _take_best_blocks(diagonal, k // 3)
        layout = _take_best_blocks(border, 2 * k // 3, layout)
        return _take_best_blocks(random, k, layout)
    if name == "strided":  # Sparse Transformer: a local band plus every stride-th diagonal
        stride = max(2, math.isqrt(C))
        i = torch.arange(R)[:, None] * C // R
        j = torch.arange(C)[None, :]
        on_stride = ((j - i) % stride == stride - 1).double()
        layout = _take_best_blocks(diagonal, k // 2)
        return _take_best_blocks(diagonal + 2.0 * (1.0 - on_stride), k, layout)
    raise AssertionError(name)


def _blockdiag_layout(R, C, budget):
    """Block-diagonal with g groups (density 1/g): the smallest g dividing R and C with 1/g <= budget."""
    for groups in range(1, math.gcd(R, C) + 1):
        # kept cells R C / groups against budget R C, the count the caller checks (no tolerance: at
        # budget 1 - 2^-53 a tolerance let the dense layout through, one cell over the budget)
        if math.gcd(R, C) % groups == 0 and R * C // groups <= budget * R * C:
            r = torch.arange(R)[:, None] // (R // groups)
            c = torch.arange(C)[None, :] // (C // groups)
            return r == c
    raise ValueError(f"budget={budget} is too small for a block-diagonal layout with "
                     f"{R}x{C} blocks (at least {1 / math.gcd(R, C):.4f})")


@on_host
def make_pattern(name: str, out_features: int, in_features: int, budget: float = 1.0,
                 block_size: int = 32, seed: int = 0) -> Pattern:
    """A named sparsity pattern for an (out_features, in_features) weight within ``budget``.

    Args:
        name: one of :data:`PATTERN_NAMES`: 'dense' (ignores the budget, uses 1.0), 'lowrank',
            'random', 'local', 'global', 'bigbird', 'strided', 'blockdiag', 'butterfly' (flat
            block butterfly alone), 'pixelfly' (flat block butterfly + low-rank), 'monarch', or a
            sparse name with '+lowrank' (sparse part in 85% of the budget, the rank fills the rest).
        out_features, in_features: weight shape, divisible by ``block_size``.
        budget: fraction of dense parameters in (0, 1].
        block_size: block edge of the layout (1 = unstructured).
        seed: seeds the random blocks ('random', 'bigbird'); other patterns are deterministic.

    Returns:
        :class:`Pattern` with ``pattern.budget <= budget``.

    Example:
        >>> p = make_pattern('pixelfly', 4096, 1024, 0.25, block_size=32)
        >>> p.budget <= 0.25
        True
    """
    if not isinstance(name, str) or name not in PATTERN_NAMES:
        raise ValueError(f"unknown pattern name {name!r}; known: {', '.join(PATTERN_NAMES)}")
    budget = check_budget(budget)
    _check_shape(out_features, in_features, block_size)
    check_int("seed", seed, 0)
    common = dict(name=name, out_features=out_features, in_features=in_features,
                  block_size=block_size, requested_budget=budget)
    R, C = out_features // block_size, in_features // block_size
    total = budget * in_features * out_features

    if name == "dense":
        return Pattern(layout=torch.ones(R, C, dtype=torch.bool), **common)
    if name == "lowrank":
        rank = min(int(total // (in_features + out_features)), min(in_features, out_features))
        if rank < 1:
            raise ValueError(f"budget={budget} is too small for rank 1 at {out_features}x{in_features} "
                             f"(needs {(in_features + out_features) / (in_features * out_features):.4f})")
        return Pattern(rank=rank, **common)
    if name == "monarch":
        g = math.gcd(in_features, out_features)
        for nblocks in range(1, g + 1):
            if g % nblocks == 0 and monarch_params(out_features, in_features, nblocks) <= total:
                return Pattern(nblocks=nblocks, **common)
        raise ValueError(f"budget={budget} is too small for a Monarch {out_features}x{in_features}")
    if name == "pixelfly":
        plan = plan_pixelfly(out_features, in_features, budget, block_size)
        layout = flat_block_butterfly_layout(out_features, in_features, plan.butterfly_size,
                                             plan.n_factors, block_size)
        return Pattern(layout=layout, rank=plan.rank, plan=plan, **common)

    base, plus_lowrank = name.removesuffix("+lowrank"), name.endswith("+lowrank")
    sparse_total = (1.0 - LOWRANK_SHARE) * total if plus_lowrank else total
    if base == "butterfly":
        best = _best_butterfly(out_features, in_features, block_size, sparse_total)
        if best is None:
            raise ValueError(f"budget={budget} is too small for a flat block butterfly of "
                             f"{out_features}x{in_features} at block_size={block_size}")
        size, n_factors, nnz = best
        layout = flat_block_butterfly_layout(out_features, in_features, size, n_factors, block_size)
        plan = PixelflyPlan(size, n_factors, block_size, 0, nnz / (in_features * out_features))
        return Pattern(layout=layout, plan=plan, **common)
    if base == "blockdiag":
        layout = _blockdiag_layout(R, C, sparse_total / (in_features * out_features))
    else:
        k = int(sparse_total // block_size ** 2)
        if k < 1:
            raise ValueError(f"budget={budget} is too small for one {block_size}x{block_size} block "
                             f"of {out_features}x{in_features}")
        layout = _sparse_layout(base, R, C, k, seed)
    rank = 0
    if plus_lowrank:
        nnz = int(layout.sum()) * block_size ** 2
        rank = min(int((total - nnz) // (in_features + out_features)), min(in_features, out_features))
    return Pattern(layout=layout, rank=rank, **common)
