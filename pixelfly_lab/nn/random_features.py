"""Performer's positive orthogonal random features (Choromanski et al., ICLR 2021, arXiv 2009.14794).

exp(q.k / t) = E_w[phi(q) phi(k)] with phi(x) = exp(w.x' - |x'|^2 / 2) / sqrt(m), x' = x / sqrt(t),
w ~ N(0, I): the low-rank part of Scatterbrain and of Pixelfly attention. Used by the attention
layer (:mod:`pixelfly_lab.nn.attention`) and by the attention approximations
(:mod:`pixelfly_lab.studies.estimators`), so it lives apart from both.

Example:
    >>> q = torch.randn(8, 16, dtype=torch.float64)
    >>> performer_features(q, 1.0, 32).shape
    torch.Size([8, 32])
"""

from __future__ import annotations

import math

import torch

from pixelfly_lab._checks import check_int, check_number

__all__ = ["draw_feature_weights", "performer_features"]


def draw_feature_weights(dim: int, n_features: int, seed: int = 0) -> torch.Tensor:
    """Performer's projection W (m, d), float64 on the CPU: orthogonal rows within each block of d
    (QR of a Gaussian matrix) with chi(d)-distributed norms, as in FAVOR+.

    Args:
        dim: d, the width of the queries and keys.
        n_features: m >= 1.
        seed: seeds the draw (the same W for the same seed).

    Returns:
        (m, d) float64.
    """
    check_int("dim", dim)
    check_int("n_features", n_features)
    generator = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-n_features // dim)):
        gaussian = torch.randn(dim, dim, generator=generator, dtype=torch.float64, device="cpu")
        blocks.append(torch.linalg.qr(gaussian).Q.T)                  # d orthonormal rows
    norms = torch.randn(n_features, dim, generator=generator, dtype=torch.float64, device="cpu").norm(dim=1)
    return torch.cat(blocks)[:n_features] * norms[:, None]


def performer_features(x: torch.Tensor, temperature: float, n_features: int, seed: int = 0,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """log phi(x) of Performer's positive orthogonal random features, up to a shared constant.

    log phi(x) = w.x' - |x'|^2 / 2 - log(m) / 2 with x' = x / sqrt(t), the rows w of W from
    :func:`draw_feature_weights` (or ``weights``). Logs keep low temperatures from overflowing;
    callers exponentiate after subtracting a maximum that the row normalisation of attention cancels.

    Args:
        x: (..., n, d) queries or keys.
        temperature: t > 0.
        n_features: m >= 1.
        seed: the same seed must be used for queries and keys (ignored with ``weights``).
        weights: a drawn (m, d) W to reuse (a layer keeps it in a buffer, so no draw per call).

    Returns:
        (..., n, m) log-features.
    """
    temperature = check_number("temperature", temperature)
    check_int("n_features", n_features)
    if weights is None:
        weights = draw_feature_weights(x.shape[-1], n_features, seed)
    elif tuple(weights.shape) != (n_features, x.shape[-1]):
        raise ValueError(f"weights must have shape (n_features, d) = ({n_features}, {x.shape[-1]}), "
                         f"got {tuple(weights.shape)}")
    w = weights.to(device=x.device, dtype=x.dtype)
    scaled = x / math.sqrt(temperature)
    return scaled @ w.T - scaled.square().sum(-1, keepdim=True) / 2 - math.log(n_features) / 2
