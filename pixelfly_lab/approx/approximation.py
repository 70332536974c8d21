"""Approximation classes: the best approximation of a matrix by each sparsity pattern at a budget.

``approximate(A, pattern, budget)`` returns the best approximation of A the pattern can give
within ``budget`` (a fraction of A's entries, counted as in :mod:`pixelfly_lab.structure.patterns`) and its
relative error ||A - A_hat||_F / ||A||_F, using the exact projections of
:mod:`pixelfly_lab.structure.projections`: fixed masks keep the entries on the mask, low-rank is the
truncated SVD, sparse + low-rank (pixelfly, X+lowrank) alternates the two until the error stops
decreasing (searching the split of the budget between the parts), Monarch is its blockwise low-rank
projection; a butterfly product is fitted by gradient descent. Oracles bound them all: 'topk' (best
support of the same size), 'topk_blocks' (best blocks) and 'topk+lowrank' (adaptive support +
low-rank). Complex targets (the DFT) work. The table over targets, patterns, budgets and seeds is
:mod:`pixelfly_lab.approx.expressiveness`. Reference: Dao, Chen et al., "Pixelated Butterfly",
ICLR 2022, arXiv 2112.00029, Sec. 4.

Example:
    >>> from pixelfly_lab.approx.targets import target_matrix
    >>> a = target_matrix('sparse_lowrank', 64)
    >>> approximate(a, 'pixelfly', 0.25, block_size=4).error < approximate(a, 'butterfly', 0.25, block_size=4).error
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from pixelfly_lab._checks import check_budget, check_number
from pixelfly_lab.structure.masks import flat_block_butterfly_layout
from pixelfly_lab.structure.patterns import LOWRANK_SHARE, PATTERN_NAMES, Pattern, PixelflyPlan, butterfly_candidates, make_pattern
from pixelfly_lab.structure.projections import (few_threads, monarch_dense, monarch_project, relative_error, sparse_plus_lowrank,
                          topk_block_layout, topk_mask, truncated_svd)
from pixelfly_lab.nn.butterfly import ButterflyLinear, bit_reversal_permutation

__all__ = ["APPROXIMATION_NAMES", "Approximation", "approximate", "ORACLE_NAMES", "LOWRANK_SHARES"]

ORACLE_NAMES = ("topk", "topk_blocks", "topk+lowrank")
APPROXIMATION_NAMES = PATTERN_NAMES + ORACLE_NAMES + ("butterfly_product",)


@dataclass(frozen=True, eq=False)
class Approximation:
    """The best approximation a pattern gives of a target.

    Attributes:
        matrix: (out, in) approximation, same dtype as the target.
        error: relative Frobenius error ||A - matrix||_F / ||A||_F.
        params: stored parameters (complex entries count once, as in a complex layer).
        pattern: the :class:`Pattern` used (oracles get one with the support they chose), or None
            for a fitted butterfly product.
        name: the method's name ('pixelfly', 'topk', 'butterfly_product', ...).
        history: relative error after every iteration (one entry for one-shot projections).
        candidates: for the 'pixelfly' class search, one row per split tried (butterfly_size,
            n_factors, rank, sparse_budget, lowrank_share, error); empty otherwise.
    """

    matrix: torch.Tensor
    error: float
    params: int
    pattern: Pattern | None
    name: str
    history: tuple[float, ...] = field(default=())
    candidates: tuple[dict, ...] = field(default=())

    @property
    def budget(self) -> float:
        """Fraction of a dense matrix's entries used."""
        return self.params / self.matrix.numel()

    @property
    def rank(self) -> int:
        """Rank of the low-rank part (0 = none)."""
        return 0 if self.pattern is None else self.pattern.rank

    @property
    def sparse_budget(self) -> float:
        """Fraction of the matrix's entries stored by the sparse part."""
        return 0.0 if self.pattern is None else self.pattern.sparse_params / self.matrix.numel()

    @property
    def lowrank_share(self) -> float:
        """Share of the used parameters spent on the low-rank part: 0 = sparse only, 1 = low-rank only."""
        return 0.0 if self.pattern is None or not self.params else (self.params - self.pattern.sparse_params
                                                                     - _monarch_part(self.pattern)) / self.params

    @property
    def iterations(self) -> int:
        return len(self.history)


def _check_matrix(matrix, name: str = "matrix", square: bool = False) -> torch.Tensor:
    """A finite, non-zero 2-D float or complex tensor (ints become float64)."""
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(matrix).__name__}")
    if matrix.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(matrix.shape)}")
    if square and matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be square here, got shape {tuple(matrix.shape)}")
    if not (matrix.is_floating_point() or matrix.is_complex()):
        matrix = matrix.to(torch.float64)
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    if not bool(matrix.ne(0).any()):
        raise ValueError(f"{name} is all zeros: its relative error is undefined")
    return matrix.detach()


def _rank_for(params_left: float, out_features: int, in_features: int) -> int:
    """The largest rank whose r (in + out) parameters fit in params_left (0 if none)."""
    return max(0, min(int(params_left // (in_features + out_features)), min(in_features, out_features)))


def _monarch_part(pattern: Pattern) -> int:
    return pattern.params - pattern.sparse_params - pattern.rank * (pattern.in_features + pattern.out_features)


def _split_pattern(name: str, matrix: torch.Tensor, budget: float, block_size: int, seed: int,
                   lowrank_share: float) -> Pattern:
    """A sparse + low-rank pattern whose sparse part gets (1 - lowrank_share) of the budget and
    whose rank fills the rest; the oracles' sparse part is chosen from the target itself."""
    out_features, in_features = matrix.shape
    total = budget * matrix.numel()
    sparse_total = (1.0 - lowrank_share) * total
    common = dict(name=name, out_features=out_features, in_features=in_features, requested_budget=budget)
    if name in ORACLE_NAMES:
        if name == "topk_blocks":
            if out_features % block_size or in_features % block_size:
                raise ValueError(f"block_size={block_size} must divide both sides of matrix "
                                 f"{tuple(matrix.shape)}")
            layout = topk_block_layout(matrix, int(sparse_total // block_size ** 2), block_size)
        else:
            block_size, layout = 1, topk_mask(matrix, int(sparse_total))
        nnz = int(layout.sum()) * block_size ** 2
    elif lowrank_share < 1.0:
        base = "butterfly" if name == "pixelfly" else name.removesuffix("+lowrank")
        sparse = make_pattern(base, out_features, in_features, (1.0 - lowrank_share) * budget,
                              block_size, seed)
        layout, nnz = sparse.layout, sparse.sparse_params
    else:
        layout, nnz = None, 0
    rank = _rank_for(total - nnz, out_features, in_features) if name.endswith(("+lowrank", "pixelfly")) else 0
    if nnz + rank == 0:
        raise ValueError(f"budget={budget} is too small for pattern {name!r} on matrix {tuple(matrix.shape)}")
    return Pattern(layout=layout, block_size=block_size, rank=rank, **common)


def approximate(matrix: torch.Tensor, pattern: str | Pattern, budget: float | None = None, *,
                block_size: int = 1, seed: int = 0, lowrank_share: float | None = None,
                max_iter: int = 50, tol: float = 1e-4, fit_steps: int = 1500) -> Approximation:
    """Best approximation of ``matrix`` that ``pattern`` can give within ``budget``.

    Args:
        matrix: (out, in) float or complex target A; finite and not all zero.
        pattern: a name from :data:`APPROXIMATION_NAMES` (a :func:`make_pattern` name, an oracle
            'topk' / 'topk_blocks' / 'topk+lowrank', or 'butterfly_product'), or a ready
            :class:`Pattern` of A's shape.
        budget: fraction of A's entries in (0, 1]; required for names except 'dense'.
        block_size: block edge of the pattern (1 = unstructured); ignored by 'topk',
            'topk+lowrank' and 'butterfly_product'.
        seed: seeds random patterns and the butterfly fit.
        lowrank_share: for sparse + low-rank names ('pixelfly', 'X+lowrank', 'topk+lowrank'),
            the share of the budget given to the low-rank term (0 = sparse alone, 1 = low-rank
            alone). None: 'pixelfly' searches every split (below); 'X+lowrank' searches the
            shares of :data:`LOWRANK_SHARES` and the low-rank shares of Pixelfly's own grid at the
            same budget, the same way (a baseline must get the search Pixelfly gets);
            'topk+lowrank' keeps its split (LOWRANK_SHARE = 15% before rounding).
        max_iter, tol: stopping rule of the sparse + low-rank alternation (relative improvement
            per round below ``tol``: the default 1e-4 stops where the curve is flat to the eye).
        fit_steps: Adam steps of the butterfly fit.

    Returns:
        :class:`Approximation` with error = ||A - A_hat||_F / ||A||_F; ``.rank``,
        ``.sparse_budget`` and ``.lowrank_share`` give the split used.

    Pixelfly as a class ('pixelfly', no ``lowrank_share``): the best flat block butterfly + low-rank
    approximation over a grid of splits. The grid is every distinct flat block butterfly layout
    of A's shape (every butterfly_size, every n_factors, at ``block_size``) that fits the budget,
    each with the rank that fills the rest, plus low-rank alone: low-rank share 1 (rank alone)
    and share 0 (the 'butterfly' pattern of the whole budget, whose layout is on the grid) are
    included, so the result is never worse than either part alone at the same budget. The grid is
    nested: a layout that fits budget b fits every larger budget, with at least the same rank, so
    with exact projections of each split (its class optimum) the error cannot rise with the
    budget. Rank alone and sparse alone are exact; a mixed split uses the alternating
    projections, which start from the better part alone and never increase the error but
    converge only linearly, so monotonicity holds up to what the stopping rule leaves
    (``tol=0`` and a large ``max_iter`` make it tight). Every split is tried (see
    ``.candidates``), the best is returned.

    Example:
        >>> a = target_matrix('lowrank', 32, rank=2)
        >>> approximate(a, 'lowrank', 0.25).error < 1e-12
        True
        >>> best = approximate(target_matrix('sparse_lowrank', 64), 'pixelfly', 0.25, block_size=4)
        >>> best.error <= approximate(target_matrix('sparse_lowrank', 64), 'butterfly', 0.25, block_size=4).error
        True
    """
    matrix = _check_matrix(matrix, square=isinstance(pattern, str) and pattern == "butterfly_product")
    with few_threads(matrix.numel()):
        return _approximate(matrix, pattern, budget, block_size, seed, lowrank_share, max_iter, tol, fit_steps)


def _approximate(matrix, pattern, budget, block_size, seed, lowrank_share, max_iter, tol, fit_steps):
    if isinstance(pattern, Pattern):
        if lowrank_share is not None:
            raise ValueError("lowrank_share applies to pattern names; a ready Pattern already fixes its rank")
        if (pattern.out_features, pattern.in_features) != tuple(matrix.shape):
            raise ValueError(f"pattern is for {pattern.out_features}x{pattern.in_features}, "
                             f"matrix is {tuple(matrix.shape)}")
        if budget is not None and pattern.budget > check_budget(budget) + 1e-12:
            raise ValueError(f"pattern uses budget {pattern.budget:.4f} > budget={budget}")
        name = pattern.name
    elif isinstance(pattern, str) and pattern in APPROXIMATION_NAMES:
        name = pattern
        if budget is None and name != "dense":
            raise ValueError(f"budget is required for pattern {name!r}")
        budget = check_budget(1.0 if budget is None else budget)
        if name == "butterfly_product":
            return _fit_butterfly(matrix, budget, seed, fit_steps)
        if lowrank_share is not None:
            if not name.endswith(("+lowrank", "pixelfly")):
                raise ValueError(f"lowrank_share applies to sparse + low-rank patterns, not {name!r}")
            share = check_number("lowrank_share", lowrank_share, high=1.0, include_low=True)
            pattern = _split_pattern(name, matrix, budget, block_size, seed, share)
        elif name in ORACLE_NAMES:
            pattern = _split_pattern(name, matrix, budget, block_size, seed,
                                     LOWRANK_SHARE if name == "topk+lowrank" else 0.0)
        elif name == "pixelfly":
            return _split_class(matrix, _pixelfly_splits(matrix, budget, block_size), "pixelfly", budget, max_iter,
                                tol)
        elif name.endswith("+lowrank"):
            return _split_class(matrix, _lowrank_splits(name, matrix, budget, block_size, seed), name, budget,
                                max_iter, tol)
        else:
            pattern = make_pattern(name, *matrix.shape, budget, block_size, seed)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(APPROXIMATION_NAMES)}")
    return _project(matrix, pattern, name, max_iter, tol)


def _project(matrix, pattern, name, max_iter, tol) -> Approximation:
    """The best approximation of ``matrix`` on ``pattern`` (exact, or alternating for sparse + low-rank)."""
    if pattern.nblocks:
        approx = monarch_dense(*monarch_project(matrix, pattern.nblocks))
        history = [relative_error(matrix, approx)]
    elif pattern.layout is None:
        approx = truncated_svd(matrix, pattern.rank)
        history = [relative_error(matrix, approx)]
    elif not pattern.rank:
        approx = matrix * pattern.mask().to(matrix.device)
        history = [relative_error(matrix, approx)]
    elif name == "topk+lowrank":  # the support moves with the residual: project onto k-sparse
        k = int(pattern.layout.sum())
        sparse, low, history = sparse_plus_lowrank(matrix, lambda r: r * topk_mask(r, k),
                                                   pattern.rank, max_iter, tol)
        approx = sparse + low
        pattern = replace(pattern, layout=topk_mask(matrix - low, k))  # the support finally used
    else:
        mask = pattern.mask().to(matrix.device)
        sparse, low, history = sparse_plus_lowrank(matrix, lambda r: r * mask, pattern.rank, max_iter, tol)
        approx = sparse + low
    return Approximation(approx, history[-1], pattern.params, pattern, name, tuple(history))


def _pixelfly_splits(matrix: torch.Tensor, budget: float, block_size: int):
    """The nested grid of :func:`approximate`'s Pixelfly class search: every distinct flat block
    butterfly layout of the shape within the budget with the rank filling the rest, then rank alone."""
    out_features, in_features = matrix.shape
    if out_features % block_size or in_features % block_size:
        raise ValueError(f"block_size={block_size} must divide both sides of matrix {tuple(matrix.shape)}")
    total, width = budget * matrix.numel(), out_features + in_features
    common = dict(name="pixelfly", out_features=out_features, in_features=in_features, requested_budget=budget)
    for size, n_factors, nnz in butterfly_candidates(out_features, in_features, block_size):
        if nnz <= total:
            rank = _rank_for(total - nnz, out_features, in_features)
            layout = flat_block_butterfly_layout(out_features, in_features, size, n_factors, block_size)
            plan = PixelflyPlan(size, n_factors, block_size, rank, (nnz + rank * width) / matrix.numel())
            yield Pattern(layout=layout, block_size=block_size, rank=rank, plan=plan, **common)
    rank = _rank_for(total, out_features, in_features)
    if rank:
        yield Pattern(block_size=block_size, rank=rank, **common)


# The class search screens every split with a few alternation rounds and runs only the best
# REFINED to the full stopping rule: a full run of every split cost 5-15 s per call at n = 256.
# Measured on 24 cases (attention, sparse + low-rank, sparse and Toeplitz targets, n = 64 and
# 128, budgets 0.15-0.4): refining every split changed no answer and took 1-4.6x longer. Rank
# alone and sparse alone are exact after one round.
SCREEN_ROUNDS, REFINED = 3, 2


# The split grid of the X+lowrank baselines: the low-rank shares tried (0 = the sparse pattern of the
# whole budget, 1 = rank alone), so that every baseline gets a search like Pixelfly's
LOWRANK_SHARES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def _lowrank_splits(name: str, matrix: torch.Tensor, budget: float, block_size: int, seed: int):
    """The X+lowrank class: :func:`_split_pattern` at every share of :data:`LOWRANK_SHARES` and at every
    low-rank share of Pixelfly's own grid at this budget (:func:`_pixelfly_shares`) that fits: the
    split search Pixelfly gets, on another sparse support."""
    seen = set()
    for share in sorted(set(LOWRANK_SHARES) | _pixelfly_shares(matrix, budget, block_size)):
        try:
            pattern = _split_pattern(name, matrix, budget, block_size, seed, share)
        except ValueError as err:  # the sparse part's share is below its smallest layout
            if "too small" not in str(err):
                raise
            continue
        key = (pattern.sparse_params, pattern.rank)
        if key not in seen:
            seen.add(key)
            yield pattern


def _pixelfly_shares(matrix: torch.Tensor, budget: float, block_size: int) -> set:
    """Low-rank shares 1 - nnz / (budget * size) of the flat block butterfly layouts of Pixelfly's grid
    (:func:`_pixelfly_splits`) within the budget; empty where the block does not divide the shape."""
    out_features, in_features = matrix.shape
    if out_features % block_size or in_features % block_size:
        return set()
    total = budget * matrix.numel()
    return {round(1.0 - nnz / total, 9) for _, _, nnz in butterfly_candidates(out_features, in_features, block_size)
            if nnz <= total}


def _split_class(matrix, splits, name, budget, max_iter, tol) -> Approximation:
    """Best sparse + low-rank approximation over a grid of splits (ties go to the earlier split)."""
    screened = [_project(matrix, pattern, name, min(max_iter, SCREEN_ROUNDS), tol) for pattern in splits]
    if not screened:
        raise ValueError(f"budget={budget} is too small for pattern {name!r} on matrix {tuple(matrix.shape)}")
    order = sorted(range(len(screened)), key=lambda i: screened[i].error)
    results = list(screened)
    if max_iter > SCREEN_ROUNDS:
        for i in order[:REFINED]:
            if len(screened[i].history) > SCREEN_ROUNDS:    # stopped by the round limit, not by tol
                refined = _project(matrix, screened[i].pattern, name, max_iter, tol)
                results[i] = min(refined, screened[i], key=lambda r: r.error)
    rows = tuple(dict(butterfly_size=r.pattern.plan.butterfly_size if r.pattern.plan else 0,
                      n_factors=r.pattern.plan.n_factors if r.pattern.plan else 0, rank=r.rank,
                      sparse_budget=r.sparse_budget, lowrank_share=r.lowrank_share, error=r.error)
                 for r in results)
    best = min(results, key=lambda r: r.error)
    return replace(best, candidates=rows)


def _fit_butterfly(matrix: torch.Tensor, budget: float, seed: int, steps: int, lr: float = 0.05,
                   restarts: int = 2) -> Approximation:
    """Fit W = B_{2^m} ... B_2 P (a ``ButterflyLinear``) to A by Adam on ||W - A||_F^2.

    m = min(log2 n, budget * n / 2) factors of 2n twiddles each (complex twiddles for a complex
    A, each counted once). Butterfly fitting has poor local minima (Dao et al. 2019 search over
    many starts), so: 2 * ``restarts`` candidates (input permutation P identity or bit-reversal,
    the one the DFT needs, times ``restarts`` initialisations) train for steps / 4 at a constant
    ``lr``; the best continues for the remaining steps with a cosine decay to zero.
    """
    n = matrix.shape[0]
    if n < 2 or n & (n - 1):
        raise ValueError(f"butterfly_product needs a square matrix of power-of-two size, got {tuple(matrix.shape)}")
    n_factors = min(n.bit_length() - 1, int(budget * n / 2))
    if n_factors < 1:
        raise ValueError(f"budget={budget} is too small for one butterfly factor of size {n} (needs >= {2 / n:.4f})")
    real_dtype = matrix.real.dtype
    eye = torch.eye(n, dtype=real_dtype, device=matrix.device)

    def loss_of(layer):
        return (layer(eye).T - matrix).abs().square().sum()   # layer(I) = I W^T

    def train(layer, opt, count, scheduler=None):
        for _ in range(count):
            opt.zero_grad()
            loss_of(layer).backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
        with torch.no_grad():
            return loss_of(layer).sqrt().item() / torch.linalg.norm(matrix).item()

    candidates = []
    for restart in range(restarts):
        for reverse in (False, True):
            with torch.random.fork_rng(devices=[]):   # reproducible without touching the global RNG
                torch.manual_seed(seed * restarts + restart)
                layer = ButterflyLinear(n, n_factors, complex=matrix.is_complex(), dtype=real_dtype,
                                        device=matrix.device)
            if reverse:
                layer.perm.copy_(bit_reversal_permutation(n))
            opt = torch.optim.Adam(layer.parameters(), lr=lr)
            candidates.append((train(layer, opt, steps // 4), layer, opt))
    first_error, layer, opt = min(candidates, key=lambda c: c[0])
    rest = steps - steps // 4
    error = train(layer, opt, rest, torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(rest, 1)))
    with torch.no_grad():
        approx = layer.dense_weight().to(matrix.dtype)
    params = layer.weight_params // (2 if layer.complex else 1)
    return Approximation(approx, relative_error(matrix, approx), params, None, "butterfly_product",
                         (first_error, error))
