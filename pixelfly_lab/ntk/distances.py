"""Distances between kernels and their spectra: how far a sparse model's NTK is from the dense one's.

:func:`kernel_distance` gives the relative Frobenius distance ||K_s - K_d||_F / ||K_d||_F and the
scale-free ones (trace-normalised and centred relative Frobenius, alignment, CKA);
:func:`spectra` gives eigenvalue spectra. A claim about a kernel's *shape* uses a scale-free metric
(:data:`SCALE_FREE_METRICS`) and is compared with the dense seed-to-seed spread
(:func:`pixelfly_lab.ntk.empirical.seed_spread`).

References:
    Cortes, Mohri, Rostamizadeh. "Algorithms for Learning Kernels Based on Centered Alignment."
        JMLR 2012 (centred alignment).
    Kornblith et al. "Similarity of Neural Network Representations Revisited." ICML 2019 (CKA).
    Dao, Chen et al. "Pixelated Butterfly." ICLR 2022. arXiv 2112.00029 (NTK distance of
        sparse models to the dense model).
"""

from __future__ import annotations

import pandas as pd
import torch

__all__ = ["DISTANCE_METRICS", "SCALE_FREE_METRICS", "ASYMMETRIC_METRICS", "kernel_distance", "spectra"]

DISTANCE_METRICS = ("relative_frobenius", "relative_frobenius_normalized", "relative_frobenius_centered",
                    "alignment", "cka")
# The metrics that ignore each kernel's scale: a claim about kernel *shape* uses one of these.
SCALE_FREE_METRICS = ("relative_frobenius_normalized", "relative_frobenius_centered", "alignment", "cka")
# Metrics that measure k1 against the reference k2 (swapping them changes the value).
ASYMMETRIC_METRICS = ("relative_frobenius", "relative_frobenius_normalized", "relative_frobenius_centered")


def _check_kernels(k1, k2) -> tuple:
    for name, k in (("k1", k1), ("k2", k2)):
        if not isinstance(k, torch.Tensor) or k.dim() not in (2, 4):
            raise TypeError(f"{name} must be a 2-D (N1, N2) or 4-D (N1, N2, O, O) kernel tensor, got "
                            f"{type(k).__name__}{tuple(getattr(k, 'shape', ()))}")
    if k1.shape != k2.shape:
        raise ValueError(f"k1 and k2 must have the same shape, got k1 {tuple(k1.shape)} and k2 {tuple(k2.shape)}")
    if k1.numel() == 0:
        raise ValueError("k1 and k2 are empty")
    return k1.detach().double(), k2.detach().to(k1.device).double()


def _as_matrix(k: torch.Tensor) -> torch.Tensor:
    """(N1, N2) as is; (N1, N2, O, O) as the (N1 O, N2 O) matrix of all output pairs."""
    if k.dim() == 2:
        return k
    n1, n2, o1, o2 = k.shape
    return k.permute(0, 2, 1, 3).reshape(n1 * o1, n2 * o2)


def _centred(m: torch.Tensor) -> torch.Tensor:
    """H M H with H = I - 1 1^T / N: M less its row and column means, plus its grand mean."""
    return m - m.mean(0, keepdim=True) - m.mean(1, keepdim=True) + m.mean()


def kernel_distance(k1: torch.Tensor, k2: torch.Tensor, metric: str = "relative_frobenius") -> float:
    """Distance between two kernels on the same examples (k2 is the reference, e.g. dense).

    Args:
        k1, k2: kernels of the same shape, (N1, N2) or (N1, N2, O, O).
        metric:

            * 'relative_frobenius': ||K1 - K2||_F / ||K2||_F. Depends on scale: invariant only to
              scaling both kernels by the same factor, so a kernel that is merely smaller or larger
              (a sparse model's trace) reads as far. Asymmetric (K2 is the reference).
            * 'relative_frobenius_normalized': the same for the trace-normalised kernels
              K / tr K (square kernels only). Scale-free: invariant to scaling either kernel by a
              positive factor. Asymmetric. An NTK at initialisation often has a large constant
              (mean) part, which then dominates this distance.
            * 'relative_frobenius_centered': the same for the centred, trace-normalised kernels
              H K H / tr(H K H), H = I - 1 1^T / N (square kernels only). Scale-free and blind to
              a constant added to a kernel (H 1 = 0), so it compares the part of the kernel that
              tells examples apart. Asymmetric.
            * 'alignment': 1 - <K1, K2>_F / (||K1||_F ||K2||_F), one minus the cosine between the
              kernels. Scale-free (either kernel, positive factor), symmetric.
            * 'cka': the alignment of the centred kernels H K H, H = I - 1 1^T / N (square
              kernels only; Cortes et al. 2012, Kornblith et al. 2019). Scale-free, symmetric,
              and also blind to a constant added to a kernel.

            A claim about the *shape* of a kernel uses a scale-free metric
            (:data:`SCALE_FREE_METRICS`) and compares it with the dense seed-to-seed spread of
            :func:`pixelfly_lab.ntk.empirical.seed_spread`.

    Returns:
        float, 0 for identical kernels; computed in float64.

    Example:
        >>> k = torch.eye(3)
        >>> abs(kernel_distance(2 * k, k, 'alignment')) < 1e-12
        True
        >>> kernel_distance(2 * k, k, 'relative_frobenius')
        1.0
    """
    if metric not in DISTANCE_METRICS:
        raise ValueError(f"metric must be one of {', '.join(DISTANCE_METRICS)}; got {metric!r}")
    m1, m2 = (_as_matrix(k) for k in _check_kernels(k1, k2))
    if metric in ("relative_frobenius_normalized", "relative_frobenius_centered"):
        if m1.shape[0] != m1.shape[1]:
            raise ValueError(f"metric={metric!r} needs square kernels K(x, x), got k1 of shape {tuple(k1.shape)}")
        if metric == "relative_frobenius_centered":
            m1, m2 = (_centred(m) for m in (m1, m2))
        traces = (m1.trace(), m2.trace())
        if any(t <= 0 for t in traces):
            raise ValueError(f"metric={metric!r} needs kernels with a positive trace, got traces "
                             f"{float(traces[0]):.3g} and {float(traces[1]):.3g}")
        m1, m2 = m1 / traces[0], m2 / traces[1]
    if metric.startswith("relative_frobenius"):
        norm = torch.linalg.matrix_norm(m2)
        if norm == 0:
            raise ValueError("k2 is zero; a relative distance needs a nonzero reference kernel")
        return float(torch.linalg.matrix_norm(m1 - m2) / norm)
    if metric == "cka":
        if m1.shape[0] != m1.shape[1]:
            raise ValueError(f"metric='cka' needs square kernels K(x, x), got k1 of shape {tuple(k1.shape)}")
        m1, m2 = (_centred(m) for m in (m1, m2))
    norms = torch.linalg.matrix_norm(m1) * torch.linalg.matrix_norm(m2)
    if norms == 0:
        raise ValueError(f"k1 or k2 is zero{' after centring' if metric == 'cka' else ''}; "
                         f"metric={metric!r} is undefined")
    return float(1.0 - (m1 * m2).sum() / norms)



def spectra(kernels, normalize: bool = True) -> pd.DataFrame:
    """Eigenvalue spectra of symmetric kernels K(x, x), largest first.

    Args:
        kernels: one (N, N) kernel, or a mapping name -> (N, N) kernel.
        normalize: also give each eigenvalue divided by the trace (the spectrum's shape).

    Returns:
        DataFrame with columns name, index (0 = largest), eigenvalue[, normalized].

    Example:
        >>> spectra(torch.diag(torch.tensor([1.0, 3.0])))['eigenvalue'].tolist()
        [3.0, 1.0]
    """
    if isinstance(kernels, torch.Tensor):
        kernels = {"kernel": kernels}
    if not hasattr(kernels, "items"):
        raise TypeError(f"kernels must be a tensor or a mapping name -> tensor, got {type(kernels).__name__}")
    rows = []
    for name, k in kernels.items():
        if not isinstance(k, torch.Tensor) or k.dim() != 2 or k.shape[0] != k.shape[1] or k.numel() == 0:
            raise ValueError(f"kernels[{name!r}] must be a square (N, N) kernel, got "
                             f"{tuple(getattr(k, 'shape', ()))}")
        k = k.detach().double()
        values = torch.linalg.eigvalsh((k + k.T) / 2).flip(0).cpu()
        frame = {"name": name, "index": range(len(values)), "eigenvalue": values.numpy()}
        if normalize:
            frame["normalized"] = (values / values.sum()).numpy()
        rows.append(pd.DataFrame(frame))
    return pd.concat(rows, ignore_index=True)
