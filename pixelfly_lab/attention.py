"""Attention matrices across temperatures, approximated by sparse, low-rank and sparse + low-rank.

An attention matrix A = softmax(Q K^T / t) (row-wise) is nearly uniform, hence nearly rank one,
at a high temperature t, and nearly one entry per row, hence nearly sparse, at a low one.
Sparse patterns win in the second regime, low-rank in the first; the Scatterbrain observation
(Chen et al., "Scatterbrain: Unifying Sparse and Low-rank Attention Approximation", NeurIPS
2021, arXiv 2110.15343), which Pixelfly builds on (Dao, Chen et al., ICLR 2022, Sec. 4), is that
sparse + low-rank stays accurate across both. Methods compared at one budget:

* sparse: the exact projections onto local, BigBird and flat block butterfly masks;
* low-rank: the truncated SVD (best possible), and Performer's positive orthogonal random
  features (Choromanski et al., ICLR 2021, arXiv 2009.14794), which estimate
  exp(q.k / t) = E_w[phi(q) phi(k)], phi(x) = exp(w.x' - |x'|^2 / 2) / sqrt(m), x' = x / sqrt(t),
  from Q and K alone (:func:`performer_attention`);
* sparse + low-rank: Scatterbrain's estimator (:func:`scatterbrain_attention`: Performer plus
  the exact correction exp(q.k / t) - phi(q).phi(k) on the support of the largest scores, which
  an ideal LSH finds), and the projections 'pixelfly' and 'topk+lowrank' of
  :func:`~pixelfly_lab.expressiveness.approximate`.

Example:
    >>> q, k = attention_inputs(64)
    >>> a = torch.softmax(q @ k.T / 10.0, -1)     # a hot, nearly low-rank attention matrix
    >>> relative_error(a, performer_attention(q, k, 10.0, 256)) < 0.1
    True
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from .expressiveness import approximate
from .masks import _check_int
from .projections import few_threads, relative_error, topk_mask
from .targets import attention_inputs, check_number

__all__ = ["performer_features", "performer_attention", "scatterbrain_attention", "attention_table",
           "plot_attention_table", "plot_attention_examples", "ATTENTION_METHODS"]

# method -> family, in plotting order
ATTENTION_METHODS = {"local": "sparse", "bigbird": "sparse", "butterfly": "sparse",
                     "lowrank (SVD)": "low-rank", "performer": "low-rank",
                     "scatterbrain": "sparse + low-rank", "pixelfly": "sparse + low-rank",
                     "topk+lowrank": "sparse + low-rank"}


def performer_features(x: torch.Tensor, temperature: float, n_features: int, seed: int = 0) -> torch.Tensor:
    """log phi(x) of Performer's positive orthogonal random features, up to a shared constant.

    log phi(x) = w.x' - |x'|^2 / 2 - log(m) / 2 with x' = x / sqrt(t); the rows of W (m, d) are
    orthogonal within each block of d (Gram-Schmidt of a Gaussian matrix) with chi(d)-distributed
    norms, as in FAVOR+. Logs keep low temperatures from overflowing; callers exponentiate after
    subtracting a maximum that the row normalisation of attention cancels.

    Args:
        x: (n, d) queries or keys.
        n_features: m >= 1.
        seed: the same seed must be used for queries and keys.

    Returns:
        (n, m) log-features.
    """
    temperature = check_number("temperature", temperature)
    _check_int("n_features", n_features)
    d = x.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-n_features // d)):
        gaussian = torch.randn(d, d, generator=generator, dtype=torch.float64)
        blocks.append(torch.linalg.qr(gaussian).Q.T)                  # d orthonormal rows
    norms = torch.randn(n_features, d, generator=generator, dtype=torch.float64).norm(dim=1)
    w = (torch.cat(blocks)[:n_features] * norms[:, None]).to(x.dtype)
    scaled = x / math.sqrt(temperature)
    return scaled @ w.T - scaled.square().sum(-1, keepdim=True) / 2 - math.log(n_features) / 2


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


def scatterbrain_attention(q: torch.Tensor, k: torch.Tensor, temperature: float, n_features: int,
                           n_sparse: int, seed: int = 0) -> torch.Tensor:
    """Scatterbrain's sparse + low-rank estimate of softmax(Q K^T / t).

    Unnormalised scores E = exp(Q K^T / t) are estimated by Performer, phi(Q) phi(K)^T, plus a
    sparse correction S = (E - phi(Q) phi(K)^T) on a support Omega of ``n_sparse`` entries, so
    the estimate is exact on Omega; then rows are normalised. Scatterbrain finds Omega with LSH,
    which finds the largest scores with high probability; here Omega is the exact top-n_sparse
    scores: an ideal LSH, an upper bound on what hashing can reach.
    """
    logits = q @ k.T / check_number("temperature", temperature)
    log_q = performer_features(q, temperature, n_features, seed)
    log_k = performer_features(k, temperature, n_features, seed)
    # shift row i of both parts by the same s_i (it cancels in the row normalisation) so that
    # row i's largest exact or estimated score is ~1: no row underflows at low temperature
    key_shift = log_k.max()
    shift = torch.maximum(logits.amax(-1), log_q.amax(-1) + key_shift)[:, None]
    lowrank = (log_q - (shift - key_shift)).exp() @ (log_k - key_shift).exp().T
    exact = (logits - shift).exp()
    support = topk_mask(logits, n_sparse)
    return _row_normalise(torch.where(support, exact, lowrank))


def _approximations(q, k, attention, temperature, budget, block_size, seed):
    """{method: (n, n) approximation} at one budget (see :data:`ATTENTION_METHODS`)."""
    n = attention.shape[0]
    rank = max(1, int(budget * n / 2))          # 2 n m parameters for m features or rank m
    n_sparse = int(budget * n * n / 2)          # half the budget to each part, for Scatterbrain
                                                # and for the adaptive projection 'topk+lowrank'
    out = {name: approximate(attention, name, budget, block_size=block_size, seed=seed).matrix
           for name in ("local", "bigbird", "butterfly", "pixelfly")}
    out["topk+lowrank"] = approximate(attention, "topk+lowrank", budget, lowrank_share=0.5).matrix
    out["lowrank (SVD)"] = approximate(attention, "lowrank", budget).matrix
    out["performer"] = performer_attention(q, k, temperature, rank, seed)
    out["scatterbrain"] = scatterbrain_attention(q, k, temperature, max(1, rank // 2), n_sparse, seed)
    return {name: out[name] for name in ATTENTION_METHODS}


def attention_table(n: int = 128, temperatures=None, budget: float = 0.125, seeds=1, *,
                    locality: float = 0.0, head_dim: int = 16, block_size: int = 4,
                    progress: bool = True) -> pd.DataFrame:
    """Error of every method of :data:`ATTENTION_METHODS` on attention at every temperature.

    Args:
        n: sequence length (the matrix is (n, n)).
        temperatures: t values (default 0.05 ... 10, 8 log-spaced points: scores are ~ N(0, 1),
            so this runs from nearly one-hot rows to nearly uniform ones).
        budget: fraction of n^2 every method may use; 1/8 is the density of a flat block
            butterfly with 2 factors at butterfly size 16 + a small rank.
        seeds: number of seeds or an iterable of seeds (new Q, K and random features).
        locality, head_dim: passed to :func:`~pixelfly_lab.targets.attention_inputs`.
        block_size: block edge of the sparse patterns.

    Returns:
        DataFrame with columns temperature, seed, method, family, error, and the target's
        top_mass (mean largest entry per row: 1 = one-hot rows, 1/n = uniform).
    """
    from tqdm.auto import tqdm

    temperatures = np.logspace(np.log10(0.05), 1, 8) if temperatures is None else temperatures
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    rows = []
    for temperature, seed in tqdm([(float(t), s) for t in temperatures for s in seeds], desc="attention",
                                  disable=not progress):
        with few_threads(n * n):
            q, k = attention_inputs(n, head_dim, seed, locality)
            attention = torch.softmax(q @ k.T / check_number("temperature", temperature), dim=-1)
            methods = _approximations(q, k, attention, temperature, budget, block_size, seed)
        top_mass = attention.amax(-1).mean().item()
        rows += [dict(temperature=temperature, seed=seed, method=name, family=ATTENTION_METHODS[name],
                      error=relative_error(attention, approx), top_mass=top_mass) for name, approx in methods.items()]
    return pd.DataFrame(rows)


def plot_attention_table(tables: dict, budget: float):
    """One panel per regime ({title: attention_table}): error against temperature per method."""
    import matplotlib.pyplot as plt

    styles = {"sparse": ":", "low-rank": "--", "sparse + low-rank": "-"}
    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.2), squeeze=False, sharey=True)
    for ax, (title, df) in zip(axes[0], tables.items()):
        stats = df.groupby(["method", "temperature"], sort=False).error.mean().reset_index()
        for i, name in enumerate(ATTENTION_METHODS):
            part = stats[stats.method == name]
            ax.plot(part.temperature, part.error, marker="o", ms=3, ls=styles[ATTENTION_METHODS[name]],
                    color=f"C{i}", label=f"{name} ({ATTENTION_METHODS[name]})")
        ax.set_xscale("log")
        top = max(1.05, stats.error.max() * 1.05)
        ax.set_ylim(0, min(1.5, top))  # random features can exceed 1 by far; the table has all values
        ax.set_xlabel("temperature t (low: nearly sparse, high: nearly low-rank)")
        ax.set_title(f"{title}, budget {budget}" + (" (clipped at 1.5)" if top > 1.5 else ""), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("relative Frobenius error")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
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

