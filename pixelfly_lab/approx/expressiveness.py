"""Expressiveness: how well each sparsity pattern approximates a matrix at the same budget.

:func:`expressiveness_table` runs :func:`pixelfly_lab.approx.approximation.approximate` over targets
(:mod:`pixelfly_lab.approx.targets`), patterns, budgets and seeds; :func:`plot_error_vs_budget` draws
it. The approximation classes (``approximate``, ``Approximation``, ``APPROXIMATION_NAMES``,
``ORACLE_NAMES``, ``LOWRANK_SHARES``) live in :mod:`pixelfly_lab.approx.approximation` and are
importable from here too. Reference: Dao, Chen et al., "Pixelated Butterfly", ICLR 2022,
arXiv 2112.00029, Sec. 4.

Example:
    >>> df = expressiveness_table(['dct'], ['lowrank', 'pixelfly'], [0.25], n=64, progress=False)
    >>> df.error.iloc[1] < df.error.iloc[0]
    True
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
import torch
from tqdm.auto import tqdm

from pixelfly_lab._checks import check_budget
from pixelfly_lab.structure.projections import few_threads
from pixelfly_lab.approx.targets import target_matrix
from pixelfly_lab.approx.approximation import (APPROXIMATION_NAMES, LOWRANK_SHARES, ORACLE_NAMES, Approximation,
                                               approximate)

__all__ = ["APPROXIMATION_NAMES", "Approximation", "approximate", "expressiveness_table",
           "plot_error_vs_budget", "ORACLE_NAMES", "LOWRANK_SHARES"]


def _targets(kinds, n, seeds):
    """Yield (label, seed, matrix) for every target of :func:`expressiveness_table`."""
    items = kinds.items() if isinstance(kinds, Mapping) else ((kind, kind) for kind in kinds)
    for label, spec in items:
        for seed in seeds:
            if isinstance(spec, torch.Tensor):
                yield label, seed, spec
            elif callable(spec):
                yield label, seed, spec(seed)
            elif isinstance(spec, Mapping):
                options = dict(spec)
                yield label, seed, target_matrix(options.pop("kind"), n, seed, **options)
            else:
                yield label, seed, target_matrix(spec, n, seed)


def expressiveness_table(kinds, patterns, budgets, n: int = 128, seeds=1, *, block_size: int = 4,
                         progress: bool = True, **options) -> pd.DataFrame:
    """Approximation error of every pattern on every target at every budget.

    Args:
        kinds: target kinds (names of :data:`~pixelfly_lab.approx.targets.TARGET_KINDS`), or a mapping
            label -> kind name, label -> dict(kind=..., **target_matrix options) (e.g.
            ``{'attention t=0.1': dict(kind='attention', temperature=0.1)}``), label -> a
            ready matrix (used as is for every seed), or label -> a function of the seed
            returning the matrix (e.g. the weight of a network trained from that seed).
        patterns: names from :data:`APPROXIMATION_NAMES`.
        budgets: fractions in (0, 1].
        n: target size.
        seeds: number of seeds (0, 1, ...) or an iterable of seeds; each draws a new target and
            new random patterns.
        block_size: block edge of every blocked pattern; 4 keeps blocks meaningful at n ~ 128.
        progress: show a tqdm progress bar.
        **options: passed to :func:`approximate` (max_iter, tol, lowrank_share, fit_steps).

    Returns:
        DataFrame, one row per (kind, seed, pattern, budget) with columns kind, seed, n, pattern,
        block_size, budget, budget_used, params, rank, error, iterations. Combinations a pattern
        cannot meet (budget too small for its smallest layout) are left out and listed in
        ``df.attrs['skipped']``.

    Example:
        >>> df = expressiveness_table(['dct'], ['lowrank', 'pixelfly'], [0.25], n=64, progress=False)
        >>> list(df.pattern)
        ['lowrank', 'pixelfly']
    """
    patterns, budgets = list(patterns), [check_budget(b) for b in budgets]
    unknown = [p for p in patterns if p not in APPROXIMATION_NAMES]
    if unknown:
        raise ValueError(f"unknown pattern(s) {unknown} in patterns; known: {', '.join(APPROXIMATION_NAMES)}")
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seeds or not patterns or not budgets:
        raise ValueError("seeds, patterns and budgets must each name at least one value")
    with few_threads(n * n):
        targets = list(_targets(kinds, n, seeds))
    rows, skipped = [], []
    for label, seed, matrix, name, budget in tqdm(
            [(*t, name, b) for t in targets for name in patterns for b in budgets],
            desc="expressiveness", disable=not progress):
        try:
            result = approximate(matrix, name, budget, block_size=block_size, seed=seed, **options)
        except ValueError as err:
            if "too small" not in str(err):
                raise
            skipped.append(dict(kind=label, seed=seed, pattern=name, budget=budget, reason=str(err)))
            continue
        rank = result.pattern.rank if result.pattern is not None else 0
        rows.append(dict(kind=label, seed=seed, n=matrix.shape[0], pattern=name, block_size=block_size,
                         budget=budget, budget_used=result.budget, params=result.params, rank=rank,
                         error=result.error, iterations=result.iterations))
    columns = ["kind", "seed", "n", "pattern", "block_size", "budget", "budget_used", "params", "rank",
               "error", "iterations"]
    df = pd.DataFrame(rows, columns=columns)
    df.attrs["skipped"] = skipped
    return df


def plot_error_vs_budget(df: pd.DataFrame, kinds=None, patterns=None, ncols: int = 4, size: float = 3.0,
                         title: str | None = None):
    """One panel per target: relative error against the budget used, one line per pattern.

    Points are means over seeds at each requested budget (x = the budget actually used), with a
    band of +- one standard deviation when there are several seeds.

    Args:
        df: a table from :func:`expressiveness_table`.
        kinds, patterns: subsets to draw (default: all, in table order).

    Returns:
        the matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    if not isinstance(df, pd.DataFrame) or df.empty:
        raise ValueError("df must be a non-empty DataFrame from expressiveness_table")
    kinds = list(dict.fromkeys(df.kind)) if kinds is None else list(kinds)
    patterns = list(dict.fromkeys(df.pattern)) if patterns is None else list(patterns)
    ncols = min(ncols, len(kinds))
    nrows = -(-len(kinds) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.6), squeeze=False,
                             sharey=True)
    palette = plt.cm.tab10.colors if len(patterns) <= 10 else plt.cm.tab20.colors
    colors = dict(zip(patterns, palette))
    for i, (ax, kind) in enumerate(zip(axes.flat, kinds)):
        for name in patterns:
            part = df[(df.kind == kind) & (df.pattern == name)]
            if part.empty:
                continue
            stats = part.groupby("budget").agg(x=("budget_used", "mean"), y=("error", "mean"),
                                               sd=("error", "std")).fillna(0.0)
            ax.plot(stats.x, stats.y, marker="o", ms=3, label=name, color=colors[name])
            ax.fill_between(stats.x, stats.y - stats.sd, stats.y + stats.sd, alpha=0.2, color=colors[name])
        ax.set_title(str(kind), fontsize=10)
        if i % ncols == 0:
            ax.set_ylabel("relative Frobenius error")
        if i >= len(kinds) - ncols:
            ax.set_xlabel("budget used (fraction of dense)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    legend_rows = -(-len(handles) // 6)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.suptitle(title or "Approximation error against budget")
    fig.tight_layout(rect=(0, 0.05 * legend_rows / nrows, 1, 1))
    return fig

