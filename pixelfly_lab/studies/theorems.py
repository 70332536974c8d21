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
4. Lazy training (Thm 3): as the width grows, the NTK of a network whose hidden layer is a flat
   block butterfly moves less during full-batch gradient descent while the loss still goes to
   ~0, as for a dense network (:func:`ntk_change_vs_width`).

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
from pixelfly_lab.structure.masks import flat_block_butterfly_layout, layout_to_mask

__all__ = ["residual_flat_gap", "loglog_slope", "lowrank_share_sweep", "exact_butterflies", "plot_residual_flat_gap",
           "plot_lowrank_share_sweep", "plot_exact_butterflies", "block_butterfly_factor_masks", "fit_factor_product",
           "fit_factor_product_restarts", "block_vs_butterfly", "plot_block_vs_butterfly", "ntk_change_vs_width", "plot_ntk_change"]


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


def fit_factor_product(target: torch.Tensor, masks, steps: int = 1500, seed: int = 0, restarts: int = 2,
                       lr: float = 0.1) -> float:
    """Relative error of the best product F_K ... F_1 (F_k supported on masks[k]) found by Adam.

    Minimises ||F_K ... F_1 - A||_F^2 from ``restarts`` random starts near the identity
    (I + N(0, 0.1^2) on the support, so that deep products neither vanish nor explode) with a
    cosine learning-rate decay; products of sparse factors have poor local minima, hence the
    restarts (Dao et al. 2019 search over many). The default lr 0.1 reached the Hadamard
    transform to 1e-16 in 1500 steps at n = 16 where 0.02 stalled at 0.15. Returns the smallest
    relative error.
    """
    return min(fit_factor_product_restarts(target, masks, steps, seed, restarts, lr))


def fit_factor_product_restarts(target: torch.Tensor, masks, steps: int = 1500, seed: int = 0, restarts: int = 2,
                                lr: float = 0.1) -> list[float]:
    """:func:`fit_factor_product`'s relative error from every restart (a list of ``restarts`` floats),
    so that the spread of the fits can be reported beside the best."""
    target = torch.as_tensor(target, dtype=torch.float64)
    n = target.shape[0]
    masks = [m.to(torch.float64) for m in masks]
    eye = torch.eye(n, dtype=torch.float64)
    errors = []
    for restart in range(restarts):
        generator = torch.Generator().manual_seed(seed * restarts + restart)
        factors = [((eye + 0.1 * torch.randn(n, n, generator=generator, dtype=torch.float64)) * m)
                   .requires_grad_() for m in masks]
        opt = torch.optim.Adam(factors, lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
        with few_threads(n * n):
            for _ in range(steps):
                opt.zero_grad()
                product = eye
                for f, m in zip(factors, masks):
                    product = (f * m) @ product
                loss = (product - target).square().sum()
                loss.backward()
                opt.step()
                schedule.step()
            with torch.no_grad():
                product = eye
                for f, m in zip(factors, masks):
                    product = (f * m) @ product
        errors.append(relative_error(target, product.detach()))
    return errors


def block_vs_butterfly(n: int = 32, block_sizes=(2, 4), kinds=("hadamard", "butterfly"),
                       steps: int = 1500, seed: int = 0) -> pd.DataFrame:
    """Block butterfly products against butterfly products with the same number of parameters.

    For each block size b the block butterfly product of full depth log2(n/b) (2 n b log2(n/b)
    parameters, dense support) is fitted to each target, beside a butterfly product (b = 1) with
    as many factors as that parameter count buys (b log2(n/b) factors of 2 n: a deeper
    composition cycling through the strides) and the plain butterfly of log2 n factors. The
    targets are the butterfly family's home ground, butterfly products themselves: Hadamard and a
    random butterfly product (the DCT is one only after a permutation, so it is left out by
    default). Every class here contains the plain butterfly product (set the extra factors to the
    identity, or merge factors as block 2 does), so a fit of a containing class worse than the
    plain butterfly's is an optimisation failure, not a lack of expressiveness.

    Returns:
        DataFrame with columns kind, method, block_size, n_factors, params, error (best restart),
        error_worst (worst restart).
    """
    rows = []
    depth = n.bit_length() - 1
    for kind in kinds:
        target = target_matrix(kind, n, seed)
        target = target.real if target.is_complex() else target
        configs = [("butterfly (log2 n factors)", 1, depth)]
        for b in block_sizes:
            block_depth = (n // b).bit_length() - 1
            configs += [(f"block butterfly (block {b})", b, block_depth),
                        (f"butterfly, params of block {b}", 1, b * block_depth)]
        for method, b, k in configs:
            masks = block_butterfly_factor_masks(n, b, k)
            errors = fit_factor_product_restarts(target, masks, steps, seed)
            rows.append(dict(kind=kind, method=method, block_size=b, n_factors=k,
                             params=int(sum(m.sum().item() for m in masks)),
                             error=min(errors), error_worst=max(errors)))
    return pd.DataFrame(rows)


# --------------------------------------------------------------- Thm 3: lazy training, NTK

def _mlp(params: dict, x: torch.Tensor, mask: torch.Tensor, fan_in: int) -> torch.Tensor:
    # NTK parametrisation (Jacot et al. 2018): weights N(0, 1), each layer scaled by
    # 1 / sqrt(its fan-in), so the kernel has a width-independent limit
    h1 = torch.relu(x @ params["w1"].T / math.sqrt(x.shape[1]))
    h2 = torch.relu(h1 @ (params["w2"] * mask).T / math.sqrt(fan_in))
    return h2 @ params["v"] / math.sqrt(h2.shape[1])


def _ntk(params, x, mask, fan_in) -> torch.Tensor:
    jac = torch.func.jacrev(_mlp)(params, x, mask, fan_in)
    flat = torch.cat([j.reshape(x.shape[0], -1) for j in jac.values()], 1)
    return flat @ flat.T


def ntk_change_vs_width(widths=(64, 128, 256, 512), sparse: bool = True, n_samples: int = 16, dim: int = 16,
                        steps: int = 1000, seeds: int = 1, butterfly_size: int = 16,
                        n_factors: int = 2) -> pd.DataFrame:
    """Relative change of the NTK of a two-hidden-layer ReLU MLP under full-batch gradient descent.

    The hidden (width x width) layer is masked by a flat block butterfly layout with
    ``butterfly_size`` blocks per side (block width / butterfly_size, density
    (1 + n_factors) / butterfly_size at every width, so a unit's fan-in grows with the width as
    Thm 3 of the Pixelfly paper needs) or dense (``sparse=False``). Training: gradient descent
    on L = ||f(X) - y||^2 / (2 N) with step N / lambda_max(K_0), y = +-1 labels of N random unit
    inputs; in the lazy (NTK) regime the kernel moves by O(1 / sqrt(width)).

    Returns:
        DataFrame with columns width, seed, density, ntk_change = ||K_T - K_0||_F / ||K_0||_F,
        loss_ratio = L_T / L_0.

    Example:
        >>> df = ntk_change_vs_width((32, 128), steps=100)
        >>> bool(df.ntk_change.iloc[1] < df.ntk_change.iloc[0]), bool((df.loss_ratio < 0.1).all())
        (True, True)
    """

    rows = []
    for width in widths:
        if sparse:
            block = width // butterfly_size
            layout = flat_block_butterfly_layout(width, width, butterfly_size, n_factors, block)
            mask = layout_to_mask(layout, block).to(torch.float64)
        else:
            mask = torch.ones(width, width, dtype=torch.float64)
        fan_in = int(mask.sum(1).max().item())       # every row keeps the same number of entries
        for seed in range(seeds):
            generator = torch.Generator().manual_seed(seed)
            x = torch.randn(n_samples, dim, generator=generator, dtype=torch.float64)
            x = x / x.norm(dim=1, keepdim=True) * math.sqrt(dim)
            y = torch.randint(0, 2, (n_samples,), generator=generator).to(torch.float64) * 2 - 1
            params = {"w1": torch.randn(width, dim, generator=generator, dtype=torch.float64),
                      "w2": torch.randn(width, width, generator=generator, dtype=torch.float64),
                      "v": torch.randn(width, generator=generator, dtype=torch.float64)}
            with few_threads(width * width):
                k0 = _ntk(params, x, mask, fan_in)
                lr = n_samples / torch.linalg.eigvalsh(k0).max().item()
                loss0 = (_mlp(params, x, mask, fan_in) - y).square().mean().item() / 2
                for _ in range(steps):
                    grads = torch.func.grad(lambda p: (_mlp(p, x, mask, fan_in) - y).square().mean() / 2)(params)
                    params = {name: p - lr * grads[name] for name, p in params.items()}
                loss = (_mlp(params, x, mask, fan_in) - y).square().mean().item() / 2
                k1 = _ntk(params, x, mask, fan_in)
            rows.append(dict(width=width, seed=seed, density=mask.mean().item(),
                             ntk_change=(torch.linalg.norm(k1 - k0) / torch.linalg.norm(k0)).item(),
                             loss_ratio=loss / loss0))
    return pd.DataFrame(rows)


def plot_ntk_change(tables: dict, slopes: dict):
    """NTK change and final loss against width, one line per network ({label: ntk_change_vs_width table})."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, (label, df) in enumerate(tables.items()):
        mean = df.groupby("width").mean(numeric_only=True)
        axes[0].loglog(mean.index, mean.ntk_change, "o-", color=f"C{i}", label=f"{label} (slope {slopes[label]:.2f})")
        axes[1].loglog(mean.index, mean.loss_ratio, "o-", color=f"C{i}", label=label)
    ref = next(iter(tables.values())).groupby("width").ntk_change.mean()
    axes[0].loglog(ref.index, ref.iloc[0] * (ref.index / ref.index[0]) ** -0.5, "--", color="grey",
                   label="width^-1/2 reference")
    axes[0].set_ylabel("||K_T - K_0|| / ||K_0||")
    axes[1].set_ylabel("training loss L_T / L_0")
    for ax in axes:
        ax.set_xlabel("width")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("Lazy training: the NTK moves less as the width grows (Pixelfly paper, Thm 3)")
    fig.tight_layout()
    return fig


def plot_block_vs_butterfly(df: pd.DataFrame, n: int):
    """Bars of log fit error per method and target (a :func:`block_vs_butterfly` table)."""
    table = df.pivot(index="method", columns="kind", values="error").reindex(df.method.unique())
    params = df.drop_duplicates("method").set_index("method").params
    table.index = [f"{m} [{params[m]} params]" for m in table.index]
    return _error_bars(table, "target", f"Block butterfly against butterfly at equal parameters, n={n}", (8, 4))
