"""The Pixelfly theorems made visible, numerically (the ``theory`` experiment of ``reproduce``).

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

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .claims import Claim, save_figure, save_table
from .expressiveness import approximate
from .projections import few_threads, relative_error
from .targets import random_butterfly_factors, target_matrix

__all__ = ["residual_flat_gap", "loglog_slope", "lowrank_share_sweep", "exact_butterflies", "plot_residual_flat_gap",
           "plot_lowrank_share_sweep", "plot_exact_butterflies", "experiment_theory"]


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


def experiment_theory(out: Path, *, quick: bool, device: str) -> list[Claim]:
    """The three measurements of the module docstring, as figures, tables and checked claims.

    Quick: sweeps at n = 64, exact transforms at n = 16 (600 fit steps); full: n = 128 and n = 64
    (2000 fit steps). CPU only, whatever ``device``: the matrices are small.
    """
    n_sweep, n_exact, steps = (64, 16, 600) if quick else (128, 64, 2000)
    claims = []

    gap = residual_flat_gap(64)
    fit_max = 1e-2  # the asymptotic regime: beyond it the O(lam^3) terms bend the curve
    fitted = gap[gap.lam <= fit_max]
    slope = loglog_slope(fitted.lam, fitted.gap)
    save_table(gap, out, "residual_flat_gap")
    figure = save_figure(plot_residual_flat_gap(gap, slope, fit_max, 64), out, "residual_flat_gap")
    print(f"[theory] residual vs flat butterfly: fitted log-log slope {slope:.4f} (lam <= {fit_max})")
    claims.append(Claim("Pixelfly Thm 1: the gap between residual butterfly prod(I + lam B_k) and flat "
                        "butterfly I + lam sum B_k shrinks as lam^2 (log-log slope 2)",
                        f"fitted slope {slope:.4f} over lam in [{fitted.lam.min():.0e}, {fit_max:.0e}], "
                        f"n=64; gap/lam^2 at the smallest lam {fitted.gap_over_lam2.iloc[0]:.3f}",
                        abs(slope - 2.0) < 0.05, figure))

    budget = 0.2
    targets = {"sparse + low-rank": target_matrix("sparse_lowrank", n_sweep),
               "attention (t=0.5, local)": target_matrix("attention", n_sweep, temperature=0.5, locality=1.0)}
    sweeps, alone, rows = {}, {}, []
    for label, matrix in targets.items():
        sweeps[label] = lowrank_share_sweep(matrix, ["topk+lowrank", "pixelfly"], budget)
        alone[label] = {name: approximate(matrix, name, budget, block_size=4).error
                        for name in ("topk", "butterfly", "lowrank")}
        rows += [dict(target=label, **row) for row in sweeps[label].to_dict("records")]
        rows += [dict(target=label, pattern=f"{name} alone", share=float("nan"), error=error)
                 for name, error in alone[label].items()]
    save_table(pd.DataFrame(rows), out, "lowrank_share_sweep")
    figure = save_figure(plot_lowrank_share_sweep(sweeps, alone, budget), out, "lowrank_share_sweep")

    def best(label, name):
        part = sweeps[label][(sweeps[label].pattern == name) & sweeps[label].share.between(0, 1, "neither")]
        return part.error.min()

    adaptive = {label: (best(label, "topk+lowrank"), min(alone[label]["topk"], alone[label]["lowrank"]))
                for label in targets}
    fixed = {label: (best(label, "pixelfly"), min(alone[label]["butterfly"], alone[label]["lowrank"]))
             for label in targets}
    claims.append(Claim("Pixelfly Thm 2: sparse + low-rank beats sparse alone and low-rank alone at equal "
                        "budget on sparse + low-rank and attention targets (best split, adaptive support)",
                        "; ".join(f"{k}: {v[0]:.3f} vs best single part {v[1]:.3f}" for k, v in adaptive.items())
                        + f" (budget {budget}, n={n_sweep})",
                        all(s < single for s, single in adaptive.values()), figure))
    label = "attention (t=0.5, local)"
    claims.append(Claim("With the fixed flat block butterfly support (pixelfly, block 4), the best split beats "
                        "the flat block butterfly alone and low-rank alone on local attention",
                        "; ".join(f"{k}: {v[0]:.3f} vs best single part {v[1]:.3f}" for k, v in fixed.items())
                        + " (a fixed mask cannot catch a randomly placed sparse part, so only attention is claimed)",
                        bool(fixed[label][0] < fixed[label][1]), figure))

    exact = exact_butterflies(n_exact, fit_steps=steps)
    save_table(exact, out, "exact_butterflies")
    figure = save_figure(plot_exact_butterflies(exact, n_exact), out, "exact_butterflies")
    err = exact.set_index(["transform", "method"]).error
    exact_ok = bool((err.xs("butterfly product (exact twiddles)", level="method") < 1e-12).all())
    flat = err[[m.startswith("flat") for _, m in err.index]]
    claims.append(Claim("Butterfly products represent the DFT and Hadamard transforms exactly; flat and "
                        "flat block butterflies at the same budget do not",
                        "; ".join(f"{t}: exact twiddles {err[t, 'butterfly product (exact twiddles)']:.1e}, "
                                  f"gradient fit {err[t, 'butterfly product (gradient fit)']:.1e}, "
                                  f"flat {err[t, 'flat butterfly (block 1)']:.3f}, low-rank {err[t, 'low-rank']:.3f}"
                                  for t in ("dft", "hadamard")) + f" (n={n_exact})",
                        exact_ok and bool((flat > 0.1).all()), figure))
    return claims
