"""Singular-value spectra and effective rank of a model's weights.

Sparse (Pixelfly) weights are full-rank matrices in general, low-rank ones are not; these
numbers show which a trained weight turned out to be.

* singular values s_1 >= s_2 >= ... of a weight W (its dense equivalent for sparse layers);
* effective rank (Roy & Vetterli 2007): exp(H(p)), p_i = s_i / sum_j s_j, H the Shannon
  entropy; n for an orthogonal n x n matrix, 1 for a rank-1 matrix;
* stable rank: ||W||_F^2 / ||W||_2^2 = sum s_i^2 / s_1^2, between 1 and rank(W).

Example:
    >>> round(effective_rank(torch.eye(8)), 6)
    8.0
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
import pandas as pd

__all__ = ["singular_values", "effective_rank", "stable_rank", "layer_weights", "gated_layers", "weight_ranks",
           "weight_spectra", "plot_spectra"]


def _gated(module: nn.Module) -> bool:
    """A gated Pixelfly layer: (1 - g(x)) S x + g(x) U V^T x has no single weight matrix."""
    return getattr(module, "gate", None) is not None


def _layer_weight(module: nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of a linear layer: ``dense_weight()`` of sparse layers, else ``.weight``."""
    if hasattr(module, "dense_weight"):
        return module.dense_weight()
    if isinstance(module, nn.Linear):
        return module.weight
    return None


def layer_weights(model: nn.Module, include=("*",)) -> dict[str, torch.Tensor]:
    """Dense (out, in) weights of the model's linear layers, detached, in float64 on the CPU.

    Args:
        model: any nn.Module (a DDP wrapper's ``.module`` is used).
        include: fnmatch patterns of module names to keep.

    Returns:
        {module name: (out_features, in_features) float64 tensor}; a structured layer counts once,
        as a whole, not also through its parts. A gated Pixelfly layer (``gating=True``) has no
        weight matrix (its mix of S and U V^T depends on the input): it and its parts are skipped
        (:func:`gated_layers` names them).
    """
    model = getattr(model, "module", model)
    weights, skipped = {}, gated_layers(model)
    for name, module in model.named_modules():
        if any(name.startswith(f"{taken}.") for taken in weights):
            continue  # a part of a layer already taken whole (PixelflyLinear's sparse and low-rank terms)
        if any(name == gated or name.startswith(f"{gated}.") for gated in skipped):
            continue  # no dense weight to take (see the docstring)
        if name and any(fnmatch.fnmatchcase(name, p) for p in include):
            with torch.no_grad():
                weight = _layer_weight(module)
            if weight is not None:
                weights[name] = weight.detach().to("cpu", torch.float64)
    return weights


def gated_layers(model: nn.Module) -> list[str]:
    """Names of the model's gated Pixelfly layers, which :func:`layer_weights` skips (no weight matrix)."""
    model = getattr(model, "module", model)
    return [name for name, module in model.named_modules() if _gated(module)]


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of a 2-D tensor, descending, float64.

    Args:
        weight: (m, n).

    Returns:
        (min(m, n),) float64.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight))}")
    return torch.linalg.svdvals(weight.detach().to("cpu", torch.float64))


def _spectrum(weight_or_s: torch.Tensor) -> torch.Tensor:
    return weight_or_s if weight_or_s.dim() == 1 else singular_values(weight_or_s)


def effective_rank(weight_or_s: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values): Roy & Vetterli's effective rank.

    Args:
        weight_or_s: a (m, n) matrix or its singular values (k,).

    Returns:
        a float in [1, min(m, n)] (0.0 for the zero matrix).
    """
    s = _spectrum(weight_or_s).to(torch.float64)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(weight_or_s: torch.Tensor) -> float:
    """||W||_F^2 / ||W||_2^2 (0.0 for the zero matrix)."""
    s = _spectrum(weight_or_s).to(torch.float64)
    return 0.0 if s.numel() == 0 or s[0] <= 0 else float((s ** 2).sum() / s[0] ** 2)


def weight_ranks(model: nn.Module, include=("*",)):
    """Effective and stable rank of each linear layer's weight.

    Returns:
        DataFrame with columns layer, out_features, in_features, effective_rank, stable_rank; gated
        Pixelfly layers have no weight matrix and no row (``df.attrs['skipped']`` names them).
    """

    rows = []
    for name, weight in layer_weights(model, include).items():
        s = singular_values(weight)
        rows.append({"layer": name, "out_features": weight.shape[0], "in_features": weight.shape[1],
                     "effective_rank": effective_rank(s), "stable_rank": stable_rank(s)})
    frame = pd.DataFrame(rows, columns=["layer", "out_features", "in_features", "effective_rank", "stable_rank"])
    frame.attrs["skipped"] = [n for n in gated_layers(model) if any(fnmatch.fnmatchcase(n, p) for p in include)]
    return frame


def weight_spectra(model: nn.Module, include=("*",)):
    """Singular values of each linear layer's weight, one row per value.

    Returns:
        DataFrame with columns layer, index (0 = largest), singular_value, normalised (s_i / s_1).
    """

    frames = []
    for name, weight in layer_weights(model, include).items():
        s = singular_values(weight)
        frames.append(pd.DataFrame({"layer": name, "index": range(len(s)), "singular_value": s.numpy(),
                                    "normalised": (s / s[0]).numpy() if s[0] > 0 else s.numpy()}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["layer", "index", "singular_value", "normalised"])


def plot_spectra(spectra: dict, ax=None, title: str = "Singular-value spectra"):
    """Plot normalised singular values s_i / s_1 against i / n for several weights.

    Args:
        spectra: {label: (k,) singular values or (m, n) weight}.
        ax: matplotlib axes (default: a new figure).
        title: axes title.

    Returns:
        the matplotlib axes.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    for label, values in spectra.items():
        s = _spectrum(torch.as_tensor(values))
        s = s / s[0] if s[0] > 0 else s
        ax.plot((torch.arange(len(s)) + 0.5).numpy() / len(s), s.numpy(),
                label=f"{label} (eff. rank {effective_rank(s):.0f})")
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(ax.get_ylim()[0], 1e-6))  # below ~1e-7 s_1 is float32 rounding, not structure
    ax.set_xlabel("singular value index i / n")
    ax.set_ylabel("s_i / s_1")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return ax
