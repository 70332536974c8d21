"""The Pixelfly theorems made visible, numerically (composed into figures by the ``theory`` study).

Three measurements (Dao, Chen et al., "Pixelated Butterfly", ICLR 2022, arXiv 2112.00029):

1. Flat vs residual butterfly (Thm 1, Sec. 3.2): the residual butterfly prod_k (I + lam B_k)
   and its first-order term, the flat butterfly I + lam sum_k B_k, differ by
   lam^2 sum_{i > j} B_i B_j + O(lam^3), so the gap ||prod - flat||_F / ||flat||_F shrinks as
   lam^2: slope 2 on a log-log plot (:func:`residual_flat_gap`, :func:`loglog_slope`).
   Relative to the perturbation ||R - I|| the gap is O(lam) (slope 1).
2. Sparse + low-rank (Thm 2, Sec. 4): at a fixed budget, moving the low-rank share from 0
   (sparse alone) to 1 (low-rank alone) traces a U-shaped error curve whose interior beats both
   ends on sparse + low-rank and attention targets (:func:`lowrank_share_sweep`).
3. Exactness (Dao et al., ICML 2019, arXiv 1903.05895): butterfly products represent the DFT and
   Hadamard transforms exactly with 2 n log2 n parameters, while flat and block butterflies with
   the same budget trade that exactness for hardware-friendly sparsity (:func:`exact_butterflies`).
   Block butterfly products (b x b blocks) against butterfly products with as many parameters,
   fitted to the butterfly family's own targets (:func:`block_vs_butterfly`; Sec. 3.2).
   Fits start from random factors and from the hierarchical factorisation
   (:func:`butterfly_factorization`), exact on members of the class.
4. Lazy training (Thm 3) lives in :mod:`pixelfly_lab.studies.lazy_training`.

Example:
    >>> df = residual_flat_gap(16, [1e-3, 1e-2])
    >>> round(loglog_slope(df.lam, df.gap))
    2
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from pixelfly_lab.approx.expressiveness import approximate
from pixelfly_lab.structure.projections import few_threads, relative_error
from pixelfly_lab.approx.targets import random_butterfly_factors, target_matrix
from pixelfly_lab.nn.butterfly import ButterflyLinear
from pixelfly_lab.structure.masks import butterfly_factor_mask

__all__ = ["residual_flat_gap", "loglog_slope", "lowrank_share_sweep", "exact_butterflies", "plot_residual_flat_gap",
           "plot_lowrank_share_sweep", "plot_exact_butterflies", "block_butterfly_factor_masks", "fit_factor_product",
           "fit_factor_product_restarts", "butterfly_factorization", "block_vs_butterfly", "plot_block_vs_butterfly"]


def residual_flat_gap(n: int = 64, lams=None, seed: int = 0) -> pd.DataFrame:
    """Relative gap between the residual and the flat butterfly built from the same factors.

    Args:
        n: size, a power of two; the log2(n) factors B_2, ..., B_n are random with N(0, 1/2)
            entries on their supports (:func:`~pixelfly_lab.approx.targets.random_butterfly_factors`).
        lams: residual scales (default 15 values log-spaced over [1e-4, 1]).

    Returns:
        DataFrame with columns lam, gap = ||R - F||_F / ||F||_F where
        R = (I + lam B_n) ... (I + lam B_2) and F = I + lam (B_2 + ... + B_n),
        gap_over_lam2 = gap / lam^2 (constant in the lam -> 0 limit), and gap_over_change =
        ||R - F||_F / ||R - I||_F: the gap relative to what the residual adds to the identity,
        O(lam) (slope 1), since R - I = lam sum B_k + O(lam^2). Relative to ||F|| ~ ||I|| the gap
        looks O(lam^2) only because the identity dominates both; relative to the perturbation the
        flat butterfly's first-order error is O(lam).
    """
    lams = np.logspace(-4, 0, 15) if lams is None else np.asarray(lams, dtype=float)
    if lams.ndim != 1 or not len(lams) or not np.all(lams > 0):
        raise ValueError("lams must be a non-empty 1-D sequence of positive numbers")
    factors = random_butterfly_factors(n, seed)
    eye = torch.eye(n, dtype=torch.float64)
    total = torch.stack(factors).sum(0)
    rows = []
    for lam in lams:
        residual = eye
        with few_threads(n * n):
            for factor in factors:        # stride 1 first: R = (I + lam B_n) ... (I + lam B_2)
                residual = (eye + lam * factor) @ residual
        flat = eye + lam * total
        gap = relative_error(flat, residual)
        change = (torch.linalg.norm(residual - flat) / torch.linalg.norm(residual - eye)).item()
        rows.append(dict(lam=float(lam), gap=gap, gap_over_lam2=gap / lam ** 2, gap_over_change=change))
    return pd.DataFrame(rows)


def loglog_slope(x, y) -> float:
    """Least-squares slope of log(y) against log(x)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or np.any(x <= 0) or np.any(y <= 0):
        raise ValueError("loglog_slope needs at least two points with positive x and y")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def lowrank_share_sweep(matrix: torch.Tensor, patterns, budget: float, shares=None,
                        block_size: int = 4) -> pd.DataFrame:
    """Error of sparse + low-rank patterns as the low-rank share of a fixed budget moves 0 -> 1.

    Args:
        matrix: (out, in) target.
        patterns: sparse + low-rank names ('pixelfly', 'topk+lowrank', 'X+lowrank').
        budget: the fixed budget.
        shares: low-rank shares in [0, 1] (default 0, 0.1, ..., 1).

    Returns:
        DataFrame with columns pattern, share, rank, budget_used, error; shares a pattern cannot
        meet (sparse part below its smallest layout) are left out.
    """
    shares = np.linspace(0, 1, 11) if shares is None else shares
    rows = []
    for name in patterns:
        for share in shares:
            try:
                result = approximate(matrix, name, budget, block_size=block_size, lowrank_share=float(share))
            except ValueError as err:
                if "too small" not in str(err):
                    raise
                continue
            rows.append(dict(pattern=name, share=float(share), rank=result.pattern.rank,
                             budget_used=result.budget, error=result.error))
    return pd.DataFrame(rows, columns=["pattern", "share", "rank", "budget_used", "error"])


def exact_butterflies(n: int = 32, fit_steps: int = 1500, block_size: int = 4) -> pd.DataFrame:
    """Approximation error of the DFT and Hadamard transforms at the butterfly's own budget.

    The budget is that of a full butterfly product, 2 n log2 n / n^2. Methods: the butterfly
    product with the known twiddles (``ButterflyLinear.from_transform``), the butterfly product
    fitted by gradient descent, the flat butterfly (block 1) and flat block butterfly
    (``block_size``) projections, low-rank, Monarch, and the top-k oracle.

    Returns:
        DataFrame with columns transform, method, budget_used, error.
    """

    budget = 2 * (n.bit_length() - 1) / n
    rows = []
    for kind in ("dft", "hadamard"):
        target = target_matrix(kind, n)
        exact = ButterflyLinear.from_transform(kind, n, dtype=torch.float64).dense_weight().detach()
        exact = (exact / torch.linalg.norm(exact)).to(target.dtype)   # targets have unit norm
        rows.append(dict(transform=kind, method="butterfly product (exact twiddles)",
                         budget_used=budget, error=relative_error(target, exact)))
        methods = {"butterfly product (gradient fit)": ("butterfly_product", 1),
                   "flat butterfly (block 1)": ("butterfly", 1),
                   f"flat block butterfly (block {block_size})": ("butterfly", block_size),
                   "low-rank": ("lowrank", 1), "Monarch": ("monarch", 1), "top-k oracle": ("topk", 1)}
        for method, (name, block) in methods.items():
            result = approximate(target, name, budget, block_size=block, fit_steps=fit_steps)
            rows.append(dict(transform=kind, method=method, budget_used=result.budget, error=result.error))
    return pd.DataFrame(rows)


def plot_residual_flat_gap(df: pd.DataFrame, slope: float, fit_max: float, n: int):
    """Log-log gap against lam (a :func:`residual_flat_gap` table), with the lam^2 reference."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.loglog(df.lam, df.gap, "o-", label="||residual - flat|| / ||flat||")
    small = df[df.lam <= fit_max]
    ref = small.gap.iloc[0] * (df.lam / small.lam.iloc[0]) ** 2
    ax.loglog(df.lam, ref, "--", color="grey", label="lam^2 reference")
    ax.axvspan(df.lam.min(), fit_max, alpha=0.08, color="C0", label=f"fitted slope {slope:.3f}")
    ax.set_xlabel("residual scale lam")
    ax.set_ylabel("relative gap")
    ax.set_title(f"Residual vs flat butterfly, n={n}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_lowrank_share_sweep(sweeps: dict, alone: dict, budget: float):
    """One panel per target: error against low-rank share ({label: sweep table}), with the
    errors of single parts alone ({label: {name: error}}) as dashed lines."""
    import matplotlib.pyplot as plt

    ncols = min(3, len(sweeps))     # a grid of targets wraps into rows of 3
    nrows = -(-len(sweeps) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 4 * nrows), squeeze=False)
    for ax in axes.flat[len(sweeps):]:
        ax.set_visible(False)
    for ax, (label, df) in zip(axes.flat, sweeps.items()):
        for i, (name, part) in enumerate(df.groupby("pattern", sort=False)):
            ax.plot(part.share, part.error, "o-", color=f"C{i}", label=f"{name} (split swept)")
        for j, (name, error) in enumerate(alone[label].items()):
            ax.axhline(error, ls="--", color=f"C{j + 3}", label=f"{name} alone")
        ax.set_xlabel("low-rank share of the budget")
        ax.set_ylabel("relative Frobenius error")
        ax.set_title(f"{label}, budget {budget}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Sparse + low-rank against either part alone")
    fig.tight_layout()
    return fig


def _error_bars(table: pd.DataFrame, legend: str, title: str, size=(7, 4)):
    """Horizontal bars of relative error (rows: methods, columns: targets) on a log axis."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    # a log axis shows both "exact to rounding" (~1e-16) and "not close" (~1); clip true zeros
    table.clip(lower=1e-17).plot.barh(ax=ax, logx=True)
    ax.set_xlabel("relative Frobenius error (log; exact zeros drawn at 1e-17)")
    ax.set_ylabel("")
    ax.legend(title=legend, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def plot_exact_butterflies(df: pd.DataFrame, n: int):
    """Bars of log error per method and transform (an :func:`exact_butterflies` table)."""
    table = df.pivot(index="method", columns="transform", values="error").reindex(df.method.unique())
    return _error_bars(table, "transform", f"Fast transforms at the butterfly budget 2 log2(n)/n, n={n}")


# ------------------------------------------------------------- block butterfly vs butterfly

def block_butterfly_factor_masks(n: int, block_size: int = 1, n_factors: int | None = None) -> list[torch.Tensor]:
    """Supports of the factors of a block butterfly product of size n with b x b blocks.

    Factor k (k = 0, 1, ...) keeps block (i, j) of the (n/b, n/b) block grid when i XOR j is 0
    or 2^(k mod log2(n/b)), each kept block dense b x b: 2 n b entries per factor (b = 1: the
    butterfly factors B_2, B_4, ..., of 2 n entries). ``n_factors`` beyond log2(n/b) cycles
    through the strides again (a deeper composition); default log2(n/b), whose product's
    support is dense.

    Example:
        >>> [int(m.sum()) for m in block_butterfly_factor_masks(16, 4)]     # 2 n b each
        [128, 128]
    """

    if n % block_size or n // block_size < 2 or (n // block_size) & (n // block_size - 1):
        raise ValueError(f"n / block_size must be a power of two >= 2, got n={n}, block_size={block_size}")
    grid = n // block_size
    depth = grid.bit_length() - 1
    n_factors = depth if n_factors is None else n_factors
    if n_factors < 1:
        raise ValueError(f"n_factors must be >= 1, got {n_factors}")
    ones = torch.ones(block_size, block_size, dtype=torch.bool)
    return [torch.kron(butterfly_factor_mask(grid, 1 << (k % depth)), ones) for k in range(n_factors)]


def butterfly_factorization(target: torch.Tensor, block_size: int = 1) -> list[torch.Tensor]:
    """Factors of a block butterfly product fitted to A by the hierarchical rank-b split (closed form).

    The product F_{L-1} ... F_0 (F_k on :func:`block_butterfly_factor_masks` (n, b)[k], L = log2(n/b))
    splits as A = F_{L-1} diag(R_1, R_2): the largest-stride factor holds, for each block row i of
    the top half, the pair of b x b blocks [D1_i; D3_i] (and [D2_i; D4_i] for the right half), so
    the 2b x (n/2) rows {block i, block i + g/2} of A's left half equal [D1_i; D3_i] R_1[block i],
    of rank <= b. Their truncated SVD (rank b, singular values split evenly between the sides)
    gives both, and R_1, R_2 are factored the same way, down to dense 2b x 2b factors. On a member
    of the class every split is exact (error at rounding); elsewhere it is a fast, usually good,
    start for gradient descent (the hierarchical algorithm of Le Magoarou and Gribonval 2016, and
    Zheng, Riccietti and Gribonval 2023 for butterflies).

    Args:
        target: (n, n) real matrix, n / block_size a power of two >= 2.
        block_size: b.

    Returns:
        L float64 (n, n) factors, smallest stride first, each zero off its mask.

    Example:
        >>> from pixelfly_lab.approx.targets import target_matrix
        >>> h = target_matrix("hadamard", 16)
        >>> relative_error(h, torch.linalg.multi_dot(butterfly_factorization(h)[::-1])) < 1e-12
        True
    """
    a = torch.as_tensor(target, dtype=torch.float64)
    n, b = a.shape[0], block_size
    block_butterfly_factor_masks(n, b)          # checks n and b
    if a.shape != (n, n):
        raise ValueError(f"target must be square, got shape {tuple(a.shape)}")

    def split(m: torch.Tensor) -> list[torch.Tensor]:     # factors of m (size s), smallest stride first
        s = m.shape[0]
        if s == 2 * b:
            return [m.clone()]
        half, top = s // 2, torch.zeros_like(m)
        rest = torch.zeros(s, s, dtype=m.dtype)
        for i in range(half // b):
            rows = torch.cat([torch.arange(i * b, (i + 1) * b), torch.arange(half + i * b, half + (i + 1) * b)])
            for side in (0, 1):
                cols = slice(side * half, (side + 1) * half)
                u, sv, vh = torch.linalg.svd(m[rows][:, cols], full_matrices=False)
                root = sv[:b].sqrt()
                top[rows, side * half + i * b: side * half + (i + 1) * b] = u[:, :b] * root
                rest[side * half + i * b: side * half + (i + 1) * b, cols] = root[:, None] * vh[:b]
        lower = [torch.block_diag(p, q) for p, q in zip(split(rest[:half, :half]), split(rest[half:, half:]))]
        return lower + [top]

    return split(a)


def fit_factor_product(target: torch.Tensor, masks, steps: int = 1500, seed: int = 0, restarts: int = 2,
                       lr: float = 0.1, init: list | None = None) -> float:
    """Relative error of the best product F_K ... F_1 (F_k supported on masks[k]) found by Adam.

    Minimises ||F_K ... F_1 - A||_F^2 from ``restarts`` random starts near the identity
    (I + N(0, 0.1^2) on the support, so that deep products neither vanish nor explode) with a
    cosine learning-rate decay; products of sparse factors have poor local minima, hence the
    restarts (Dao et al. 2019 search over many). The default lr 0.1 reached the Hadamard
    transform to 1e-16 in 1500 steps at n = 16 where 0.02 stalled at 0.15. With ``init`` (a list
    of factors, e.g. from :func:`butterfly_factorization`) one more fit starts there, at lr / 10
    so as not to leave it at once, and counts with its start's error too (the class contains the
    start). Returns the smallest relative error.
    """
    return min(fit_factor_product_restarts(target, masks, steps, seed, restarts, lr, init))


def _product(factors, masks, eye):
    product = eye
    for f, m in zip(factors, masks):
        product = (f * m) @ product
    return product


def fit_factor_product_restarts(target: torch.Tensor, masks, steps: int = 1500, seed: int = 0, restarts: int = 2,
                                lr: float = 0.1, init: list | None = None) -> list[float]:
    """:func:`fit_factor_product`'s relative error from every restart (``restarts`` floats, then the
    fit from ``init`` when given), so that the spread of the fits can be reported beside the best."""
    target = torch.as_tensor(target, dtype=torch.float64)
    n = target.shape[0]
    masks = [m.to(torch.float64) for m in masks]
    if init is not None and len(init) != len(masks):
        raise ValueError(f"init must hold one factor per mask ({len(masks)}), got {len(init)}")
    eye = torch.eye(n, dtype=torch.float64)
    errors = []
    starts = list(range(restarts)) + ([None] if init is not None else [])
    for restart in starts:
        if restart is None:
            factors = [(torch.as_tensor(f, dtype=torch.float64) * m).clone().requires_grad_()
                       for f, m in zip(init, masks)]
            with torch.no_grad():
                start = relative_error(target, _product(factors, masks, eye))
        else:
            generator = torch.Generator().manual_seed(seed * restarts + restart)
            factors = [((eye + 0.1 * torch.randn(n, n, generator=generator, dtype=torch.float64)) * m)
                       .requires_grad_() for m in masks]
            start = math.inf
        opt = torch.optim.Adam(factors, lr=lr if restart is not None else lr / 10)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
        with few_threads(n * n):
            for _ in range(steps):
                opt.zero_grad()
                loss = (_product(factors, masks, eye) - target).square().sum()
                loss.backward()
                opt.step()
                schedule.step()
            with torch.no_grad():
                product = _product(factors, masks, eye)
        errors.append(min(start, relative_error(target, product.detach())))
    return errors


def block_vs_butterfly(n: int = 32, block_sizes=(2, 4), kinds=("hadamard", "butterfly"),
                       steps: int = 1500, seed: int = 0, restarts: int = 2) -> pd.DataFrame:
    """Block butterfly products against butterfly products with the same number of parameters.

    For each block size b the block butterfly product of full depth log2(n/b) (2 n b log2(n/b)
    parameters, dense support) is fitted to each target, beside a butterfly product (b = 1) with
    as many factors as that parameter count buys (b log2(n/b) factors of 2 n: a deeper
    composition cycling through the strides) and the plain butterfly of log2 n factors. Each fit
    is the best of ``restarts`` random starts and one start from the closed-form hierarchical
    factorisation (:func:`butterfly_factorization`: of the block class for block products, of the
    plain butterfly for the others, their extra factors the identity). The default targets are
    the butterfly family's home ground, butterfly products themselves: Hadamard and a random
    butterfly product (the DCT is one only after a permutation, so it is left out by default):
    every class fits them exactly, so a fit short of 0 there is the optimiser's failure, which
    makes them the positive control of a comparison on other targets. Every class here contains
    the plain butterfly product (set the extra factors to the identity, or merge factors as block
    2 does), so a containing class fitting worse than the plain butterfly is an optimisation
    failure, not a lack of expressiveness.

    Returns:
        DataFrame with columns kind, method, block_size, n_factors, params, error (best fit),
        error_worst (worst random restart), error_random (best random restart), error_init (the
        fit from the closed-form start).
    """
    rows = []
    depth = n.bit_length() - 1
    for kind in kinds:
        target = target_matrix(kind, n, seed)
        target = target.real if target.is_complex() else target
        plain = butterfly_factorization(target, 1)
        eye = torch.eye(n, dtype=torch.float64)
        configs = [("butterfly (log2 n factors)", 1, depth, plain)]
        for b in block_sizes:
            block_depth = (n // b).bit_length() - 1
            configs += [(f"block butterfly (block {b})", b, block_depth, butterfly_factorization(target, b)),
                        (f"butterfly, params of block {b}", 1, b * block_depth,
                         plain + [eye] * (b * block_depth - depth))]
        for method, b, k, init in configs:
            masks = block_butterfly_factor_masks(n, b, k)
            errors = fit_factor_product_restarts(target, masks, steps, seed, restarts, init=init)
            rows.append(dict(kind=kind, method=method, block_size=b, n_factors=k,
                             params=int(sum(m.sum().item() for m in masks)), error=min(errors),
                             error_worst=max(errors[:-1]), error_random=min(errors[:-1]), error_init=errors[-1]))
    return pd.DataFrame(rows)


def plot_block_vs_butterfly(df: pd.DataFrame, n: int):
    """Bars of log fit error per method and target (a :func:`block_vs_butterfly` table)."""
    table = df.pivot(index="method", columns="kind", values="error").reindex(df.method.unique())
    params = df.drop_duplicates("method").set_index("method").params
    table.index = [f"{m} [{params[m]} params]" for m in table.index]
    return _error_bars(table, "target", f"Block butterfly against butterfly at equal parameters, n={n}", (8, 4))
