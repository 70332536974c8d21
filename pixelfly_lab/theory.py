"""The Pixelfly theorems made visible, numerically (composed into figures by the ``theory`` study).

Three measurements (Dao, Chen et al., "Pixelated Butterfly", ICLR 2022, arXiv 2112.00029):

1. Flat vs residual butterfly (Thm 1, Sec. 3.2): the residual butterfly prod_k (I + lam B_k)
   and its first-order term, the flat butterfly I + lam sum_k B_k, differ by
   lam^2 sum_{i > j} B_i B_j + O(lam^3), so the gap ||prod - flat||_F / ||flat||_F shrinks as
   lam^2: slope 2 on a log-log plot (:func:`residual_flat_gap`, :func:`loglog_slope`).
2. Sparse + low-rank (Thm 2, Sec. 4): at a fixed budget, moving the low-rank share from 0
   (sparse alone) to 1 (low-rank alone) traces a U-shaped error curve whose interior beats both
   ends on sparse + low-rank and attention targets (:func:`lowrank_share_sweep`).
3. Exactness (Dao et al., ICML 2019, arXiv 1903.05895): butterfly products represent the DFT and
   Hadamard transforms exactly with 2 n log2 n parameters, while flat and block butterflies with
   the same budget trade that exactness for hardware-friendly sparsity (:func:`exact_butterflies`).

Example:
    >>> df = residual_flat_gap(16, [1e-3, 1e-2])
    >>> round(loglog_slope(df.lam, df.gap))
    2
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .expressiveness import approximate
from .projections import few_threads, relative_error
from .targets import random_butterfly_factors, target_matrix

__all__ = ["residual_flat_gap", "loglog_slope", "lowrank_share_sweep", "exact_butterflies", "plot_residual_flat_gap",
           "plot_lowrank_share_sweep", "plot_exact_butterflies"]


def residual_flat_gap(n: int = 64, lams=None, seed: int = 0) -> pd.DataFrame:
    """Relative gap between the residual and the flat butterfly built from the same factors.

    Args:
        n: size, a power of two; the log2(n) factors B_2, ..., B_n are random with N(0, 1/2)
            entries on their supports (:func:`~pixelfly_lab.targets.random_butterfly_factors`).
        lams: residual scales (default 15 values log-spaced over [1e-4, 1]).

    Returns:
        DataFrame with columns lam, gap = ||R - F||_F / ||F||_F where
        R = (I + lam B_n) ... (I + lam B_2) and F = I + lam (B_2 + ... + B_n), and
        gap_over_lam2 = gap / lam^2 (constant in the lam -> 0 limit).
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
        rows.append(dict(lam=float(lam), gap=gap, gap_over_lam2=gap / lam ** 2))
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
    from .butterfly import ButterflyLinear

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

    fig, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4), squeeze=False)
    for ax, (label, df) in zip(axes[0], sweeps.items()):
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


def plot_exact_butterflies(df: pd.DataFrame, n: int):
    """Bars of log error per method and transform (an :func:`exact_butterflies` table)."""
    import matplotlib.pyplot as plt

    table = df.pivot(index="method", columns="transform", values="error").reindex(df.method.unique())
    fig, ax = plt.subplots(figsize=(7, 4))
    # a log axis shows both "exact to rounding" (~1e-16) and "not close" (~1); clip true zeros
    table.clip(lower=1e-17).plot.barh(ax=ax, logx=True)
    ax.set_xlabel("relative Frobenius error (log; exact zeros drawn at 1e-17)")
    ax.set_ylabel("")
    ax.legend(title="transform", loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(f"Fast transforms at the butterfly budget 2 log2(n)/n, n={n}")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig

