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

__all__ = ["performer_features"]


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
    check_int("n_features", n_features)
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
