"""Monarch: W = P L P^T R, two block-diagonal factors and the reshape-transpose permutation.

Paper: Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate
Training", ICML 2022, arXiv 2204.00595 (compared with Pixelfly, arXiv 2112.00029).

Example:
    >>> MonarchLinear(4096, 1024, nblocks=4).weight_params == (1024 * 4096 + 1024 ** 2) // 4
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pixelfly_lab._checks import check_divides
from pixelfly_lab.nn.base import StructuredLinear, scale_factors_, uniform_
from pixelfly_lab.structure.projections import monarch_project

__all__ = ["MonarchLinear"]


class MonarchLinear(StructuredLinear):
    """Monarch: W = P L P^T R, two block-diagonal factors and the reshape-transpose permutation.

    With nb = nblocks, middle width mid = min(in_features, out_features) (as the authors'
    MonarchLinear), m = in_features / nb, q = mid / nb, s = out_features / nb:

    * R = blockdiag(R_0..R_{nb-1}), R_k (q, m): u[k*q + i] = sum_j R_k[i, j] x[k*m + j];
    * P^T regroups the mid-vector u: group d of L's input is u[c*nb + d] for c = 0..q-1 (view u
      as (q, nb), transpose to (nb, q));
    * L = blockdiag(L_0..L_{nb-1}), L_d (s, q), acting on group d;
    * P places row e of block d at output e*nb + d (view the (nb, s) result as (s, nb)).

    Parameters: nb*q*m + nb*s*q = mid * (in + out) / nb, i.e. (in^2 + out*in)/nb when in < out
    and (out*in + out^2)/nb when in >= out, equal to :func:`pixelfly_lab.structure.patterns.monarch_params`.
    Forward = two batched matmuls (Dao et al. 2022).

    Init: R_k entries with variance 1/m (U(-sqrt(3/m), sqrt(3/m)): each entry of u has the
    input's variance), L_d like nn.Linear with fan-in q, so the output variance matches a dense
    layer's. ``project_`` fits both factors (:func:`pixelfly_lab.structure.projections.monarch_project`).

    Attributes:
        r_blocks: Parameter (nb, q, m); l_blocks: Parameter (nb, s, q).
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        self.nblocks = check_divides("nblocks", nblocks, in_features, out_features)
        m, s = in_features // nblocks, out_features // nblocks
        q = min(in_features, out_features) // nblocks
        self.r_blocks = nn.Parameter(torch.empty(nblocks, q, m, **factory))
        self.l_blocks = nn.Parameter(torch.empty(nblocks, s, q, **factory))
        self._make_bias(bias, factory)
        self.reset_parameters()

    def _reset_weight(self) -> None:
        m, q = self.r_blocks.shape[2], self.r_blocks.shape[1]
        uniform_(self.r_blocks, math.sqrt(3.0 / m))
        uniform_(self.l_blocks, 1.0 / math.sqrt(q))

    def _scale_weight(self, c: float) -> None:
        scale_factors_([self.l_blocks, self.r_blocks], c)

    def _project(self, work):
        left, right = monarch_project(work, self.nblocks)
        self.l_blocks.copy_(left)
        self.r_blocks.copy_(right)
        return work - self.dense_weight().to(work.dtype)

    def _forward(self, x):
        nb, m = self.nblocks, self.in_features // self.nblocks
        q = self.r_blocks.shape[1]
        batch = x.shape[:-1]
        xb = x.reshape(-1, nb, m).transpose(0, 1)                       # (nb, N, m)
        u = torch.bmm(xb, self.r_blocks.transpose(1, 2))                # (nb, N, q): R_k per block
        u = u.transpose(0, 1).reshape(-1, q, nb).permute(2, 0, 1)       # P^T: (nb, N, q), group d
        w = torch.bmm(u, self.l_blocks.transpose(1, 2))                 # (nb, N, s): L_d per group
        y = w.permute(1, 2, 0).reshape(*batch, self.out_features)       # P: row e of block d -> e*nb + d
        return y if self.bias is None else y + self.bias

    def dense_weight(self):
        """P L P^T R built from block_diag and index permutations (independent of the bmm path)."""
        nb, s, q = self.l_blocks.shape
        left = torch.block_diag(*self.l_blocks)                          # (out, mid)
        right = torch.block_diag(*self.r_blocks)                         # (mid, in)
        dev = left.device
        d, c = torch.meshgrid(torch.arange(nb, device=dev), torch.arange(q, device=dev), indexing="ij")
        perm_mid = (c * nb + d).flatten()       # (P^T u)[d*q + c] = u[c*nb + d]
        e, d2 = torch.meshgrid(torch.arange(s, device=dev), torch.arange(nb, device=dev), indexing="ij")
        perm_out = (d2 * s + e).flatten()       # (P y)[e*nb + d] = y[d*s + e]
        return left[perm_out] @ right[perm_mid]

    @property
    def weight_params(self):
        return self.r_blocks.numel() + self.l_blocks.numel()

    def extra_repr(self):
        return f"{super().extra_repr()}, nblocks={self.nblocks}"
