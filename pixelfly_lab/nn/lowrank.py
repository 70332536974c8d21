"""Low-rank linear layer: W = U V^T, initialised from a dense init's best rank-r part or as two layers.

Paper: the low-rank term of Pixelfly (Dao, Chen et al., ICLR 2022, arXiv 2112.00029, Sec. 4).

Example:
    >>> LowRankLinear(256, 128, rank=8).weight_params
    3072
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pixelfly_lab._checks import check_int, check_lowrank_init
from pixelfly_lab.nn.base import LinearPart, StructuredLinear, scale_factors_, uniform_
from pixelfly_lab.structure.projections import lowrank_factors

__all__ = ["LowRankLinear"]


class LowRankLinear(StructuredLinear):
    """y = x V U^T + bias: W = U V^T with U (out_features, rank), V (in_features, rank).

    Init (``init=``):

    * 'svd' (default): the best rank-r approximation (truncated SVD) of an nn.Linear
      initialisation W0 = A diag(s) B^T, split evenly: U = A_r diag(sqrt(s_r)),
      V = B_r diag(sqrt(s_r)). Computed by torch.svd_lowrank (randomised, rank + 8 directions,
      2 power iterations): U and V are exactly balanced, the singular values within ~8% of the
      exact top ones (a random W0's spectrum is flat), at a few GEMMs' cost. W starts as the
      part of a dense init a rank-r matrix can hold.
    * 'kaiming': the two factors drawn like two stacked nn.Linear layers in -> rank -> out, as
      the authors' released low-rank layer: V ~ U(-1/sqrt(in), 1/sqrt(in)),
      U ~ U(-1/sqrt(rank), 1/sqrt(rank)) (kaiming-uniform with a = sqrt(5), torch's default).

    ``project_(W0)``: U V^T = the rank-r truncated SVD of W0, split evenly.

    Attributes:
        u: Parameter (out_features, rank); v: Parameter (in_features, rank); init.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 init: str = "svd", device=None, dtype=None):
        super().__init__(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        self.rank = check_int("rank", rank)
        if rank > min(in_features, out_features):
            raise ValueError(f"rank must be <= min(in_features, out_features)="
                             f"{min(in_features, out_features)}, got {rank}")
        self.init = check_lowrank_init(init, "init")
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.v = nn.Parameter(torch.empty(in_features, rank, **factory))
        self._make_bias(bias, factory)
        self.reset_parameters()

    def _reset_weight(self) -> None:
        """Re-draw U, V by ``init`` ('svd' computes on the host; nothing on the meta device)."""
        rank, in_features, out_features = self.rank, self.in_features, self.out_features
        if self.u.is_meta:       # no values to set: no host draw, no SVD, the global RNG untouched
            return
        if self.init == "kaiming":
            uniform_(self.v, 1.0 / math.sqrt(in_features))
            uniform_(self.u, 1.0 / math.sqrt(rank))
            return
        with torch.no_grad():
            # on the host in float32 (float64 for a float64 layer), randomised at every size: an
            # exact float64 SVD of a 3072x768 matrix costs ~1 s, a third of a minute per GPT-2 in
            # sparsify, for ~25 of its 768 singular vectors
            work = torch.float64 if self.u.dtype == torch.float64 else torch.float32
            w0 = uniform_(torch.empty(out_features, in_features, dtype=work, device="cpu"),
                          1.0 / math.sqrt(in_features))
            u, v = lowrank_factors(w0, rank)
            self.u.copy_(u)
            self.v.copy_(v)

    def _scale_weight(self, c: float) -> None:
        scale_factors_([self.u, self.v], c)

    def _project(self, work):
        """U V^T = the truncated SVD of ``work`` (randomised, :func:`torch.svd_lowrank`)."""
        u, v = lowrank_factors(work, self.rank)
        self.u.copy_(u)
        self.v.copy_(v)
        return work - u @ v.T

    def linear_parts(self) -> list[LinearPart]:
        """One low-rank part: U V^T."""
        return [LinearPart("lowrank", ("u", "v"))]

    def _forward(self, x):
        return F.linear(x @ self.v, self.u, self.bias)

    def dense_weight(self):
        return self.u @ self.v.T

    @property
    def weight_params(self):
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}" + (f", init={self.init!r}" if self.init != "svd" else "")
