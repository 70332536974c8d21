"""Attention matrices across temperatures: oracles against oracles, estimators against estimators.

An attention matrix A = softmax(Q K^T / t) (row-wise) is nearly uniform, hence nearly rank one,
at a high temperature t, and nearly one entry per row, hence nearly sparse, at a low one.
Sparse methods win in the second regime, low-rank ones in the first; the Scatterbrain observation
(Chen et al., "Scatterbrain: Unifying Sparse and Low-rank Attention Approximation", NeurIPS
2021, arXiv 2110.15343, Sec. 3), which Pixelfly builds on (Dao, Chen et al., ICLR 2022, Sec. 4),
is that sparse + low-rank is more robust across both than either part. Two kinds of method, never mixed in one
verdict (:data:`ATTENTION_METHODS` gives each method's role and family):

* *oracles* see the target A itself and project it: the best k-sparse matrix ('topk'), the
  truncated SVD ('lowrank (SVD)') and their sum by alternating projections ('topk+lowrank').
  No method of their family can beat them at the same budget; they bound, they do not model
  what a network computes.
* *estimators* see only Q and K, as an attention layer does: softmax restricted to a fixed
  block support ('local', 'bigbird', 'butterfly': :func:`pixelfly_lab.ops.attention.block_sparse_attention`
  with V = I), Performer's positive orthogonal random features (Choromanski et al., ICLR
  2021, arXiv 2009.14794; :func:`performer_attention`), and sparse + random features
  (:func:`sparse_lowrank_attention`): Scatterbrain on the support of the largest scores (an
  ideal LSH, half the budget to each part) and Pixelfly attention on the flat block butterfly
  support with the attention layer's own split, not half and half (:func:`pixelfly_attention`;
  at n = 256, block 8, budget 1/4: a (16, 2) support of density 3/16 + 8 features, 1/16).

Budgets are matched: a method may keep ``budget * n^2`` numbers. m random features cost 2 n m
(phi(Q) and phi(K), as a rank-m term), a support of s entries costs s.

Example:
    >>> q, k = attention_inputs(64)
    >>> a = torch.softmax(q @ k.T / 10.0, -1)     # a hot, nearly low-rank attention matrix
    >>> relative_error(a, performer_attention(q, k, 10.0, 256)) < 0.1
    True
"""

from __future__ import annotations

import tempfile

import numpy as np
import pandas as pd
import torch

from pixelfly_lab._checks import check_number
from pixelfly_lab.ops.attention import block_sparse_attention
from pixelfly_lab.approx.expressiveness import approximate
from pixelfly_lab.structure.masks import layout_to_mask
from pixelfly_lab.structure.projections import few_threads, relative_error, topk_mask
from pixelfly_lab.nn.random_features import performer_features
from pixelfly_lab.approx.targets import attention_inputs
from pixelfly_lab.nn.attention import PixelflyAttention, attention_layout
from pixelfly_lab.training.config import TrainConfig
from pixelfly_lab.training.data import load_data
from pixelfly_lab.training.loop import train
from pixelfly_lab.studies.network_targets import attention_queries_keys
from tqdm.auto import tqdm

__all__ = ["performer_features", "performer_attention", "sparse_lowrank_attention", "scatterbrain_attention",
           "pixelfly_attention", "pixelfly_parts", "fixed_sparse_attention", "performer_rank", "attention_table",
           "plot_attention_table",
           "plot_attention_examples", "ATTENTION_METHODS", "ATTENTION_ORACLES", "ATTENTION_ESTIMATORS", "PIXELFLY_PARTS",
           "trained_queries_keys", "attention_kinds", "layer_error_table"]

# method -> family, in plotting order: oracles first, then estimators
ATTENTION_METHODS = {"topk": "sparse", "lowrank (SVD)": "low-rank", "topk+lowrank": "sparse + low-rank",
                     "local": "sparse", "bigbird": "sparse", "butterfly": "sparse",
                     "performer": "low-rank", "scatterbrain": "sparse + low-rank", "pixelfly": "sparse + low-rank"}
ATTENTION_ORACLES = ("topk", "lowrank (SVD)", "topk+lowrank")
ATTENTION_ESTIMATORS = ("local", "bigbird", "butterfly", "performer", "scatterbrain", "pixelfly")
# Pixelfly attention's own two parts, each alone (cheaper than the whole: not an equal-budget comparison):
# exact softmax on its flat block butterfly support only, and Performer with its m random features only
PIXELFLY_PARTS = {"pixelfly: sparse part": "sparse", "pixelfly: low-rank part": "low-rank"}


def performer_rank(n: int, budget: float) -> int:
    """Random features (or rank) m that ``budget`` buys on an (n, n) matrix: m cost 2 n m, so m = budget n / 2."""
    return max(1, int(budget * n / 2))


def _row_normalise(scores: torch.Tensor) -> torch.Tensor:
    # a row whose estimate underflowed entirely stays zero (a finite, honest error), never NaN
    return scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def performer_attention(q: torch.Tensor, k: torch.Tensor, temperature: float, n_features: int,
                        seed: int = 0) -> torch.Tensor:
    """Performer's estimate D^-1 phi(Q) phi(K)^T of softmax(Q K^T / t), as a dense (n, n) matrix.

    A rank-``n_features`` factorisation: 2 n m parameters, the budget of a rank-m low-rank term.
    """
    log_q = performer_features(q, temperature, n_features, seed)
    log_k = performer_features(k, temperature, n_features, seed)
    # per-row shift of phi(Q) and one global shift of phi(K): both cancel in D^-1
    phi_q = (log_q - log_q.amax(-1, keepdim=True)).exp()
    phi_k = (log_k - log_k.max()).exp()
    return _row_normalise(phi_q @ phi_k.T)


def sparse_lowrank_attention(q: torch.Tensor, k: torch.Tensor, temperature: float, n_features: int,
                             support: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random features corrected to the exact scores on a support: the sparse + low-rank estimator.

    Unnormalised scores E = exp(Q K^T / t) are estimated by Performer, phi(Q) phi(K)^T, plus a
    sparse correction S = (E - phi(Q) phi(K)^T) on the support Omega, so the estimate is exact on
    Omega; then rows are normalised (Scatterbrain, Chen et al. 2021, Sec. 3, Eq. for the
    estimator; Pixelfly attention uses the same sum with a fixed flat block butterfly Omega).

    Args:
        q, k: (n, d) queries and keys.
        n_features: m >= 1 random features.
        support: bool (n, n) Omega.
        seed: seeds the random features.

    Returns:
        (n, n) row-stochastic estimate (rows whose estimate underflowed stay zero).

    Example:
        >>> q, k = attention_inputs(32)
        >>> full = torch.ones(32, 32, dtype=torch.bool)              # exact everywhere: softmax itself
        >>> torch.allclose(sparse_lowrank_attention(q, k, 0.5, 4, full), torch.softmax(q @ k.T / 0.5, -1))
        True
    """
    logits = q @ k.T / check_number("temperature", temperature)
    if support.shape != logits.shape or support.dtype != torch.bool:
        raise ValueError(f"support must be a bool tensor of shape {tuple(logits.shape)}, "
                         f"got {support.dtype} {tuple(support.shape)}")
    log_q = performer_features(q, temperature, n_features, seed)
    log_k = performer_features(k, temperature, n_features, seed)
    # shift row i of both parts by the same s_i (it cancels in the row normalisation) so that
    # row i's largest exact or estimated score is ~1: no row underflows at low temperature
    key_shift = log_k.max()
    shift = torch.maximum(logits.amax(-1), log_q.amax(-1) + key_shift)[:, None]
    lowrank = (log_q - (shift - key_shift)).exp() @ (log_k - key_shift).exp().T
    exact = (logits - shift).exp()
    return _row_normalise(torch.where(support.to(logits.device), exact, lowrank))


def scatterbrain_attention(q: torch.Tensor, k: torch.Tensor, temperature: float, n_features: int,
                           n_sparse: int, seed: int = 0) -> torch.Tensor:
    """Scatterbrain's sparse + low-rank estimate of softmax(Q K^T / t) (:func:`sparse_lowrank_attention`).

    Scatterbrain finds its support with LSH, which finds the largest scores with high
    probability; here the support is the exact top-``n_sparse`` scores: an ideal LSH, an upper
    bound on what hashing can reach.
    """
    support = topk_mask(q @ k.T / check_number("temperature", temperature), n_sparse)
    return sparse_lowrank_attention(q, k, temperature, n_features, support, seed)


def pixelfly_attention(q: torch.Tensor, k: torch.Tensor, temperature: float, budget: float,
                       block_size: int = 8, seed: int = 0) -> torch.Tensor:
    """Pixelfly attention (Pixelfly paper, Sec. 4) as a matrix: exact scores on a flat block
    butterfly support plus random features elsewhere, split as the attention layer splits it
    (the planner's split, not half and half: at n = 256, block 8, budget 1/4 a (16, 2) support
    of density 3/16 + 8 features, 2 * 8 / 256 = 1/16 of the scores).

    Support and feature count come from :func:`pixelfly_lab.nn.attention.attention_layout`
    ('pixelfly': the planner's split of ``budget`` into a flat block butterfly layout and m
    features, the diagonal blocks kept), so this is the matrix that
    :class:`~pixelfly_lab.nn.attention.PixelflyAttention` applies, at score scale 1 / t.
    """

    layout, n_features = attention_layout("pixelfly", q.shape[0], budget, block_size)
    support = layout_to_mask(layout, block_size).to(q.device)
    return sparse_lowrank_attention(q, k, temperature, max(1, n_features), support, seed)


def pixelfly_parts(q: torch.Tensor, k: torch.Tensor, temperature: float, budget: float, block_size: int = 8,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Pixelfly attention's two parts, each alone: {name in :data:`PIXELFLY_PARTS`: (n, n) estimate}.

    The sparse part is softmax restricted to Pixelfly's own flat block butterfly support
    (:func:`fixed_sparse_attention`); the low-rank part is Performer with Pixelfly's own m random
    features and the same seed (:func:`performer_attention`). :func:`pixelfly_attention` is their
    combination (exact on the support, the features elsewhere, rows normalised together).
    """
    layout, n_features = attention_layout("pixelfly", q.shape[0], budget, block_size)
    return {"pixelfly: sparse part": fixed_sparse_attention(q, k, temperature, layout, block_size),
            "pixelfly: low-rank part": performer_attention(q, k, temperature, max(1, n_features), seed)}


def fixed_sparse_attention(q: torch.Tensor, k: torch.Tensor, temperature: float, layout: torch.Tensor,
                           block_size: int) -> torch.Tensor:
    """softmax(Q K^T / t) restricted to a block layout, as the (n, n) matrix an attention layer applies.

    :func:`~pixelfly_lab.ops.attention.block_sparse_attention` with V = I (its rows are the
    attention weights), score scale 1 / t.
    """
    n = q.shape[0]
    eye = torch.eye(n, dtype=q.dtype, device=q.device)[None, None]
    return block_sparse_attention(q[None, None], k[None, None], eye, layout, block_size,
                                  scale=1.0 / check_number("temperature", temperature), backend="torch")[0, 0]


def _approximations(q, k, attention, temperature, budget, block_size, seed):
    """{method: (n, n) approximation} at one budget (see :data:`ATTENTION_METHODS`)."""
    n = attention.shape[0]
    rank = performer_rank(n, budget)            # 2 n m parameters for m features or rank m
    n_sparse = int(budget * n * n / 2)          # half the budget to each part, for Scatterbrain
                                                # and for the adaptive projection 'topk+lowrank'
    out = {"topk": approximate(attention, "topk", budget).matrix,
           "lowrank (SVD)": approximate(attention, "lowrank", budget).matrix,
           "topk+lowrank": approximate(attention, "topk+lowrank", budget, lowrank_share=0.5).matrix}
    kept = {}
    for name in ("local", "bigbird", "butterfly"):
        layout = _sparse_layout(name, n, budget, block_size, seed)
        kept[name] = layout.float().mean().item()
        out[name] = fixed_sparse_attention(q, k, temperature, layout, block_size)
    out["performer"] = performer_attention(q, k, temperature, rank, seed)
    out["scatterbrain"] = scatterbrain_attention(q, k, temperature, max(1, rank // 2), n_sparse, seed)
    out["pixelfly"] = pixelfly_attention(q, k, temperature, budget, block_size, seed)
    return {name: out[name] for name in ATTENTION_METHODS}, kept


def _sparse_layout(name: str, n: int, budget: float, block_size: int, seed: int) -> torch.Tensor:
    """The sparse-only baselines of the attention layer ('butterfly' is its densest flat block
    butterfly): diagonal blocks kept, so no row is empty ('bigbird' may exceed the budget by them)."""

    return attention_layout("pixelfly" if name == "butterfly" else name, n, budget, block_size,
                            lowrank_features=0, seed=seed)[0]


def attention_table(n: int = 256, temperatures=None, budget: float = 0.25, seeds=1, *,
                    locality: float = 0.0, head_dim: int = 16, block_size: int = 8, parts: bool = False,
                    progress: bool = True) -> pd.DataFrame:
    """Error of every method of :data:`ATTENTION_METHODS` on attention at every temperature.

    Args:
        n: sequence length (the matrix is (n, n)); a multiple of ``block_size``.
        temperatures: t values (default 0.05 ... 10, 8 log-spaced points: scores are ~ N(0, 1),
            so this runs from nearly one-hot rows to nearly uniform ones).
        budget: fraction of n^2 every method may keep; the default 1/4 is the training lab's
            budget (the released (16, 2) flat block butterfly alone has density 3/16).
        seeds: number of seeds or an iterable of seeds (new Q, K and random features).
        locality, head_dim: passed to :func:`~pixelfly_lab.approx.targets.attention_inputs`.
        block_size: block edge of the sparse supports.
        parts: also Pixelfly's two parts alone (:data:`PIXELFLY_PARTS`, role 'part').

    Returns:
        DataFrame with columns temperature, seed, method, role ('oracle', 'estimator' or 'part'),
        family, error, the target's top_mass (mean largest entry per row: 1 = one-hot rows,
        1/n = uniform), and kept: the fraction of the n^2 scores a fixed-support sparse estimator
        keeps (NaN for the others).
    """

    temperatures = np.logspace(np.log10(0.05), 1, 8) if temperatures is None else temperatures
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    rows = []
    for temperature, seed in tqdm([(float(t), s) for t in temperatures for s in seeds], desc="attention",
                                  disable=not progress):
        with few_threads(n * n):
            q, k = attention_inputs(n, head_dim, seed, locality)
            attention = torch.softmax(q @ k.T / check_number("temperature", temperature), dim=-1)
            methods, kept = _approximations(q, k, attention, temperature, budget, block_size, seed)
            if parts:
                methods.update(pixelfly_parts(q, k, temperature, budget, block_size, seed))
        top_mass = attention.amax(-1).mean().item()
        families = {**ATTENTION_METHODS, **PIXELFLY_PARTS}
        rows += [dict(temperature=temperature, seed=seed, method=name,
                      role="oracle" if name in ATTENTION_ORACLES else "part" if name in PIXELFLY_PARTS else "estimator",
                      family=families[name],
                      error=relative_error(attention, approx), top_mass=top_mass, kept=kept.get(name, float("nan")))
                 for name, approx in methods.items()]
    return pd.DataFrame(rows)


def plot_attention_table(tables: dict, budget: float):
    """Error against temperature per method: one column per regime ({title: attention_table}),
    estimators on the top row, oracles on the bottom one."""
    import matplotlib.pyplot as plt

    styles = {"sparse": ":", "low-rank": "--", "sparse + low-rank": "-"}
    fig, axes = plt.subplots(2, len(tables), figsize=(5.5 * len(tables), 7.5), squeeze=False, sharex=True)
    for col, (title, df) in enumerate(tables.items()):
        stats = df.groupby(["method", "temperature"], sort=False).error.mean().reset_index()
        for row, names in enumerate((ATTENTION_ESTIMATORS, ATTENTION_ORACLES)):
            ax = axes[row, col]
            for name in names:
                part = stats[stats.method == name]
                i = list(ATTENTION_METHODS).index(name)
                ax.plot(part.temperature, part.error, marker="o", ms=3, ls=styles[ATTENTION_METHODS[name]],
                        color=f"C{i}", label=f"{name} ({ATTENTION_METHODS[name]})")
            top = max(1.05, stats[stats.method.isin(names)].error.max() * 1.05)
            ax.set_ylim(0, min(1.5, top))  # random features can exceed 1 by far; the table has all values
            ax.set_xscale("log")
            kind = "estimators (from Q, K)" if row == 0 else "oracles (project A itself)"
            ax.set_title(f"{title}: {kind}, budget {budget}" + (" (clipped at 1.5)" if top > 1.5 else ""),
                         fontsize=9)
            ax.grid(alpha=0.3)
            ax.set_ylabel("relative Frobenius error")
            if col == len(tables) - 1:
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        axes[1, col].set_xlabel("temperature t (low: nearly sparse, high: nearly low-rank)")
    fig.suptitle("Attention approximation across temperatures")
    fig.tight_layout()
    return fig


def plot_attention_examples(n: int, temperatures, locality: float = 0.0):
    """Pictures of softmax(Q K^T / t) at the given temperatures (seed 0)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(temperatures), figsize=(3 * len(temperatures), 3.2))
    q, k = attention_inputs(n, locality=locality)
    for ax, t in zip(axes, temperatures):
        ax.imshow(torch.softmax(q @ k.T / t, -1).numpy(), cmap="viridis")
        ax.set_title(f"t = {t:g}", fontsize=10)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.suptitle(f"softmax(Q K^T / t), locality {locality}")
    fig.tight_layout()
    return fig


# ------------------------------------------- the attention layer on random, local and trained q, k

def trained_queries_keys(seq_len: int, *, steps: int = 200, batch_size: int = 16, seed: int = 0) -> torch.Tensor:
    """Per-head queries and keys of a small GPT trained on characters, as its attention uses them.

    The toolkit's 'tiny' GPT (:data:`pixelfly_lab.training.models.SIZES`) trained for ``steps``
    AdamW steps on the shipped Shakespeare text at context ``seq_len`` (:func:`pixelfly_lab.training.loop.train`,
    its files in a temporary folder); Q and K of every block's attention on the first held-out
    window (:func:`pixelfly_lab.studies.network_targets.attention_queries_keys`). The model's scores are
    q . k / sqrt(head_dim), causal.

    Returns:
        (q, k), each (depth, heads, seq_len, head_dim) float64: one batch row per block.
    """
    data = load_data("chars", context=seq_len)
    epochs = -(-steps * batch_size // len(data.x_train))       # the schedule spans the steps taken
    with tempfile.TemporaryDirectory() as out:
        model = train(TrainConfig(model="gpt", data="chars", context=seq_len, epochs=epochs, max_steps=steps,
                                  batch_size=batch_size, seed=seed, track_rank=False, progress=False, out=out)).model
    q, k = attention_queries_keys(model.eval(), data.x_test[:1])                         # (depth, 1, heads, T, D)
    return q[:, 0].double(), k[:, 0].double()


def attention_kinds(seq_len: int, *, head_dim: int = 32, heads: int = 2, locality: float = 2.0,
                    trained_steps: int = 200, seed: int = 0) -> dict:
    """Queries and keys of three kinds, scaled so that q . k / sqrt(head_dim) are their scores at t = 1.

    'random' and 'local': :func:`~pixelfly_lab.approx.targets.attention_inputs` (scores ~ N(0, 1);
    'local' with a positional part of weight ``locality``), one seed per head, not causal.
    'trained': :func:`trained_queries_keys` (the GPT's own scores, its blocks as batch rows), causal.

    Returns:
        {kind: (q, k, causal)}, q and k (B, heads, seq_len, head_dim) float64.
    """
    kinds = {}
    for kind, weight in (("random", 0.0), ("local", locality)):
        pairs = [attention_inputs(seq_len, head_dim, seed + h, weight) for h in range(heads)]
        q, k = (torch.stack(part)[None] for part in zip(*pairs))
        kinds[kind] = (q * head_dim ** 0.5, k, False)
    q, k = trained_queries_keys(seq_len, steps=trained_steps, seed=seed)
    kinds["trained"] = (q, k, True)
    return kinds


def layer_error_table(inputs: dict, variants: dict, temperatures=(1.0,), *, budget: float | None = None,
                      block_size: int = 32) -> pd.DataFrame:
    """Error of PixelflyAttention variants against dense softmax attention on each kind of q, k.

    Args:
        inputs: {kind: (q, k, causal)} as :func:`attention_kinds` returns.
        variants: {name: PixelflyAttention keyword options}, e.g. {'sparse only': {},
            'features': {'lowrank_features': 16}, 'paper': {'layout': 'pixelfly'}}.
        temperatures: t values: the scores are divided by t (q / t); t = 1 is the kind's own.
        budget, block_size: every variant's (the same budget: features are paid for in it).

    Returns:
        DataFrame with columns kind, causal, variant, temperature, error
        (:meth:`~pixelfly_lab.nn.attention.PixelflyAttention.error_against_dense`, relative
        Frobenius over all heads and batch rows), density and features of the variant's layer.
    """
    rows = []
    for kind, (q, k, causal) in inputs.items():
        _, heads, T, D = q.shape
        for name, options in variants.items():
            layer = PixelflyAttention(heads * D, heads, T, budget=budget, block_size=block_size, causal=causal,
                                      **options).double()
            rows += [dict(kind=kind, causal=causal, variant=name, temperature=t,
                          error=layer.error_against_dense(q / t, k), density=layer.density, features=layer.features)
                     for t in temperatures]
    return pd.DataFrame(rows)
