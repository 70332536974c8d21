"""Lazy training (Pixelfly paper, Thm 3): a wide flat block butterfly network's NTK barely moves under training.

Dao, Chen et al., "Pixelated Butterfly", ICLR 2022, arXiv 2112.00029, Thm 3: as the width grows,
a network whose hidden layer is a flat block butterfly trains in the lazy (NTK) regime like a
dense one: its kernel moves by O(1 / sqrt(width)) during full-batch gradient descent while the
training loss still goes to ~0 (:func:`ntk_change_vs_width`, drawn by :func:`plot_ntk_change`;
composed into a claim by the ``theory`` study). The density does not change with the width: the
butterfly_size is fixed, the blocks grow with the width, so a unit's fan-in grows in proportion to
it (Thm 3's wide limit needs the fan-in to grow).

Example:
    >>> df = ntk_change_vs_width((32, 128), steps=100)
    >>> bool(df.ntk_change.iloc[1] < df.ntk_change.iloc[0]), bool((df.loss_ratio < 0.1).all())
    (True, True)
"""

from __future__ import annotations

import math

import pandas as pd
import torch

from pixelfly_lab.structure.masks import flat_block_butterfly_layout, layout_to_mask
from pixelfly_lab.structure.projections import few_threads

__all__ = ["ntk_change_vs_width", "plot_ntk_change", "mlp_output", "mlp_ntk"]


def mlp_output(params: dict, x: torch.Tensor, mask: torch.Tensor, fan_in: int) -> torch.Tensor:
    """f(x) of the two-hidden-layer ReLU MLP of :func:`ntk_change_vs_width`: (N, dim) inputs -> (N,) outputs.

    params: w1 (width, dim), w2 (width, width) masked by ``mask``, v (width,); ``fan_in`` the rows' kept entries.
    """
    # NTK parametrisation (Jacot et al. 2018): weights N(0, 1), each layer scaled by
    # 1 / sqrt(its fan-in), so the kernel has a width-independent limit
    h1 = torch.relu(x @ params["w1"].T / math.sqrt(x.shape[1]))
    h2 = torch.relu(h1 @ (params["w2"] * mask).T / math.sqrt(fan_in))
    return h2 @ params["v"] / math.sqrt(h2.shape[1])


def mlp_ntk(params, x, mask, fan_in) -> torch.Tensor:
    """Empirical NTK J J^T, (N, N), of :func:`mlp_output` over all its parameters (J by ``torch.func.jacrev``)."""
    jac = torch.func.jacrev(mlp_output)(params, x, mask, fan_in)
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
        DataFrame with columns width, seed, density, fan_in (kept entries per row), ntk_change = ||K_T - K_0||_F / ||K_0||_F,
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
                k0 = mlp_ntk(params, x, mask, fan_in)
                lr = n_samples / torch.linalg.eigvalsh(k0).max().item()
                loss0 = (mlp_output(params, x, mask, fan_in) - y).square().mean().item() / 2
                for _ in range(steps):
                    grads = torch.func.grad(lambda p: (mlp_output(p, x, mask, fan_in) - y).square().mean() / 2)(params)
                    params = {name: p - lr * grads[name] for name, p in params.items()}
                loss = (mlp_output(params, x, mask, fan_in) - y).square().mean().item() / 2
                k1 = mlp_ntk(params, x, mask, fan_in)
            rows.append(dict(width=width, seed=seed, density=mask.mean().item(), fan_in=fan_in,
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
