"""Exact projections onto structured matrix sets: the building blocks of the expressiveness lab.

Each function returns the closest matrix (in Frobenius norm) of its set, so the approximation
error it leaves is the best the structure can do:

* low rank: the truncated SVD, error^2 = sum of the discarded squared singular values
  (Eckart-Young);
* k-sparse: keep the k largest |A_ij| (:func:`topk_mask`), or the k blocks of largest norm;
* sparse + low-rank: no closed form; :func:`sparse_plus_lowrank` alternates the two exact
  projections, which never increases the error (as in Scatterbrain, Chen et al., NeurIPS 2021,
  and robust PCA);
* Monarch M = P L P^T R (Dao et al., "Monarch", ICML 2022, arXiv 2204.00595, Thm 1 / Alg. 1):
  a blockwise low-rank projection, :func:`monarch_project`, with :func:`monarch_dense` its
  inverse map, in the convention of :func:`pixelfly_lab.structure.patterns.monarch_params` and
  ``pixelfly_lab.nn.layers.MonarchLinear``.

All of them work for real and complex matrices.

Example:
    >>> a = torch.randn(8, 8, dtype=torch.float64)
    >>> s = torch.linalg.svdvals(a)
    >>> torch.isclose(torch.linalg.norm(a - truncated_svd(a, 3)), s[3:].norm())
    tensor(True)
"""

from __future__ import annotations


import torch

from pixelfly_lab.threads import num_threads

__all__ = ["few_threads", "relative_error", "truncated_svd", "lowrank_factors", "topk_mask", "topk_block_layout", "sparse_plus_lowrank",
           "monarch_dense", "monarch_project"]


# Below this many entries dense linear algebra runs fastest on one thread: OpenMP start-up
# dominates, and on a shared machine the threads wait for each other. Measured on the team's
# 2-core box under load: SVD of 32x32 1 ms on one thread against 14-86 ms on two, 128x128
# 16 ms against 700 ms.
SMALL_MATRIX = 512 * 512


def few_threads(numel: int = 0):
    """Run the block on one torch thread when the matrices have at most SMALL_MATRIX entries.

    Restores the previous thread count on exit; nested uses are free.
    """
    return num_threads(1 if numel <= SMALL_MATRIX else None)


def relative_error(target: torch.Tensor, approx: torch.Tensor) -> float:
    """||target - approx||_F / ||target||_F as a Python float."""
    return (torch.linalg.norm(target - approx) / torch.linalg.norm(target)).item()


def truncated_svd(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation U_r S_r V_r^H (Eckart-Young); rank 0 gives zeros."""
    if rank <= 0:
        return torch.zeros_like(matrix)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank].to(u.dtype)) @ vh[:rank]


# Extra random directions of the randomised SVD beyond the rank, and its power iterations: the
# usual oversampling (Halko et al. 2011); two iterations bring a trained weight's top singular
# vectors to within float32 noise of the exact ones at a fraction of a full SVD's cost.
SVD_OVERSAMPLE, SVD_NITER = 8, 2


def lowrank_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (out, rank), V (in, rank)) with U V^T the rank-``rank`` truncated SVD of ``matrix`` (out, in),
    randomised (``torch.svd_lowrank``), the singular values split evenly (sqrt on each side)."""
    q = min(rank + SVD_OVERSAMPLE, *matrix.shape)
    u, s, v = torch.svd_lowrank(matrix, q=q, niter=SVD_NITER)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, v[:, :rank] * root


def topk_mask(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """bool mask of the k entries of largest |A_ij| (the exact projection onto k-sparse matrices)."""
    mask = torch.zeros(matrix.numel(), dtype=torch.bool, device=matrix.device)
    mask[torch.topk(matrix.abs().flatten(), min(k, matrix.numel())).indices] = True
    return mask.reshape(matrix.shape)


def topk_block_layout(matrix: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """bool (out/b, in/b) layout of the k blocks with the largest Frobenius norm."""
    rows, cols = matrix.shape
    energy = matrix.abs().square().reshape(rows // block_size, block_size, cols // block_size, block_size)
    return topk_mask(energy.sum(dim=(1, 3)), k)


def sparse_plus_lowrank(matrix: torch.Tensor, project_sparse, rank: int, max_iter: int = 50,
                        tol: float = 1e-4):
    """Alternating projections onto {S + L: S in a sparse set, rank(L) <= rank}.

    Starts from whichever part alone is better (so the result is never worse than either part
    alone at the same mask and rank), then repeats L <- SVD_rank(A - S), S <- P(A - L). Each
    half-step is an exact minimisation over one part, so the error never increases; it stops
    when one round improves the error by less than ``tol`` (relative) or after ``max_iter``.

    Args:
        matrix: (out, in) target A.
        project_sparse: exact projection onto the sparse set, e.g. ``lambda r: r * mask``.
        rank: rank of L.

    Returns:
        (S, L, history): the two parts and the relative error after every round.
    """
    norm = torch.linalg.norm(matrix)
    sparse, low = project_sparse(matrix), truncated_svd(matrix, rank)
    if torch.linalg.norm(matrix - sparse) <= torch.linalg.norm(matrix - low):
        low = truncated_svd(matrix - sparse, rank)
    else:
        sparse = project_sparse(matrix - low)
    history = [(torch.linalg.norm(matrix - sparse - low) / norm).item()]
    for _ in range(max_iter):
        low = truncated_svd(matrix - sparse, rank)
        sparse = project_sparse(matrix - low)
        history.append((torch.linalg.norm(matrix - sparse - low) / norm).item())
        if history[-2] - history[-1] <= tol * history[-2]:
            break
    return sparse, low, history


def _monarch_index(mid: int, nblocks: int):
    """For every middle index t = kk * q + qq (q = mid / nblocks): its L block j = t mod nblocks,
    L column r = t // nblocks, R block kk, R row qq, and its rank slot within the (j, kk) group."""
    q = mid // nblocks
    t = torch.arange(mid)
    j, kk = t % nblocks, t // q
    slot, seen = torch.empty_like(t), {}
    for idx in range(mid):
        key = (int(j[idx]), int(kk[idx]))
        slot[idx] = seen.get(key, 0)
        seen[key] = slot[idx].item() + 1
    return j, t // nblocks, kk, t % q, slot


def monarch_dense(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Dense Monarch matrix M = P L P^T R (Dao et al. 2022), the convention of monarch_params.

    R = blockdiag(right) maps x to the middle vector z = R x of width mid = min(in, out) (the
    authors' MonarchLinear); z is regrouped by the reshape-transpose permutation so that L's
    block j reads z[t] for t = j (mod nblocks), at column t // nblocks; L's block j writes
    output rows s * nblocks + j. Entry-wise,

        M[s * nb + j, c] = sum_{t = j mod nb} left[j, s, t // nb] * R[t, c].

    Args:
        left: (nblocks, out / nblocks, mid / nblocks) blocks of L.
        right: (nblocks, mid / nblocks, in / nblocks) blocks of R.

    Returns:
        (out, in) tensor.
    """
    nblocks, s, q = left.shape
    if right.dim() != 3 or right.shape[:2] != (nblocks, q):
        raise ValueError(f"right must have shape ({nblocks}, {q}, in / {nblocks}) to match left "
                         f"{tuple(left.shape)}, got {tuple(right.shape)}")
    eye = torch.eye(nblocks, dtype=left.dtype, device=left.device)
    # (s, j, r, j'): left[j, s, r] where j' == j, i.e. row s*nb + j, middle column r*nb + j
    left_dense = torch.einsum("jsr,jk->sjrk", left, eye).reshape(s * nblocks, q * nblocks)
    return left_dense @ torch.block_diag(*right)


def monarch_project(matrix: torch.Tensor, nblocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact projection of A onto Monarch matrices P L P^T R with ``nblocks`` blocks.

    By :func:`monarch_dense`, the sub-matrix of M on rows {s * nb + j} and the columns of R's
    block kk is a sum of one outer product per middle index t = j (mod nb) inside block kk,
    and different (j, kk) use disjoint t and disjoint parameters. So M is exactly "every such
    sub-block has rank <= its number of t's", and the projection is the truncated SVD of every
    sub-block of A (Monarch, Thm 1 / Alg. 1: for in = out = nb^2 each sub-block is rank one).
    The middle width is min(in, out), as in :func:`pixelfly_lab.structure.patterns.monarch_params`.

    Args:
        matrix: (out, in), both divisible by ``nblocks``.

    Returns:
        (left, right) for :func:`monarch_dense`: (nb, out/nb, mid/nb) and (nb, mid/nb, in/nb).
    """
    out_features, in_features = matrix.shape
    if out_features % nblocks or in_features % nblocks:
        raise ValueError(f"nblocks={nblocks} must divide both sides of matrix {tuple(matrix.shape)}")
    mid = min(out_features, in_features)
    s, p, q = out_features // nblocks, in_features // nblocks, mid // nblocks
    blocks = matrix.reshape(s, nblocks, nblocks, p).permute(1, 2, 0, 3)   # (j, kk, s, pp)
    u, sv, vh = torch.linalg.svd(blocks, full_matrices=False)              # batched over (j, kk)
    root = sv.sqrt().to(matrix.dtype)
    j, r, kk, qq, slot = _monarch_index(mid, nblocks)
    keep = slot < sv.shape[-1]          # groups with more t's than min(s, p) leave the rest zero
    j, r, kk, qq, slot = j[keep], r[keep], kk[keep], qq[keep], slot[keep]
    left = matrix.new_zeros(nblocks, s, q)
    right = matrix.new_zeros(nblocks, q, p)
    left[j, :, r] = u[j, kk, :, slot] * root[j, kk, slot][:, None]
    right[kk, qq, :] = vh[j, kk, slot, :] * root[j, kk, slot][:, None]
    return left, right
