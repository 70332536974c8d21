"""Structured linear layers: masked, block-sparse, low-rank, Pixelfly (sparse + low-rank), Monarch.

Every layer computes y = x W^T + bias like ``nn.Linear`` for a structured W, and gives that W as
a dense (out_features, in_features) tensor through ``dense_weight()``, the oracle every fast path
is tested against. ``weight_params`` counts the stored weight entries (bias excluded) and
``budget`` = weight_params / (in_features * out_features), the quantity
:func:`pixelfly_lab.structure.patterns.make_pattern` budgets. Each layer owns its internals
(:class:`pixelfly_lab.nn.base.StructuredLinear`: ``project_``, ``rescale_``, ``match_``,
``linear_parts``). Defined here: the sparse + low-rank layers and :func:`layer_from_pattern`; the
single-structure layers come from :mod:`.sparse`, :mod:`.lowrank` and :mod:`.monarch` and are
importable from here; ``ButterflyLinear`` lives in :mod:`pixelfly_lab.nn.butterfly`.

Papers: Pixelfly = flat block butterfly + low-rank (Dao, Chen et al., ICLR 2022,
arXiv 2112.00029); Monarch M = P L P^T R (Dao et al., ICML 2022, arXiv 2204.00595).

Example:
    >>> layer = PixelflyLinear(1024, 4096, butterfly_size=16, n_factors=2, rank=32, block_size=32)
    >>> round(layer.budget, 4)
    0.2266
    >>> layer(torch.randn(8, 1024)).shape
    torch.Size([8, 4096])
"""

from __future__ import annotations


import torch
from torch import nn

from pixelfly_lab._checks import LOWRANK_INITS, check_bool, check_int, check_lowrank_init
from pixelfly_lab.nn.base import LinearPart, StructuredLinear
from pixelfly_lab.nn.lowrank import LowRankLinear
from pixelfly_lab.nn.monarch import MonarchLinear
from pixelfly_lab.nn.sparse import BlockSparseLinear, MaskedLinear
from pixelfly_lab.ops.matmul import registered_layout, sparse_lowrank_matmul
from pixelfly_lab.structure.masks import flat_block_butterfly_layout
from pixelfly_lab.structure.patterns import Pattern, PixelflyPlan, plan_pixelfly

# Every structured layer is found here (``from pixelfly_lab.nn.layers import ...``); the base class
# and the single-structure layers are defined in pixelfly_lab.nn.base, .sparse, .lowrank, .monarch.
__all__ = ["LOWRANK_INITS", "StructuredLinear", "MaskedLinear", "BlockSparseLinear", "LowRankLinear",
           "SparseLowRankLinear", "PixelflyLinear", "MonarchLinear", "layer_from_pattern"]


class SparseLowRankLinear(StructuredLinear):
    """y = x (S + U V^T)^T + bias: a block-sparse part plus a low-rank part (Scatterbrain/Pixelfly).

    Args:
        in_features, out_features: sizes.
        layout: bool block layout of S; block_size: its block edge.
        rank: rank of U V^T (0 = none, then ``lowrank`` is None).
        bias: learn a bias (held here; the sub-modules have none).
        gating: False (default): y = S x + U V^T x + bias. True: the released Pixelfly code's mix
            y = (1 - g) S x + g U V^T x + bias with g = sigmoid(w^T x + c) per row of x
            (``gate`` = nn.Linear(in_features, 1), default init). A gated layer is not linear in
            x, so it has no dense_weight(): test it against that formula.
        lowrank_init: 'svd' (default) or 'kaiming', the init of U and V (see :class:`LowRankLinear`).
        backend: kernel backend of the sparse part (see :class:`BlockSparseLinear`).

    The authors' released layer is gated with kaiming-initialised factors
    (``gating=True, lowrank_init='kaiming'``). Ours defaults to the ungated sum with SVD factors
    because that layer is linear: it has a dense weight (the oracle every fast path, projection
    and sparsify init is tested against), runs as one fused sparse + low-rank kernel call, and
    keeps the structured NTK rules exact; the SVD init starts U V^T as the best rank-r part of a
    dense init instead of a random product. Both are a keyword away, and the studies run both.

    ``project_(W0)``: S = W0 on the support, U V^T the truncated SVD of the rest, S refitted.
    ``rescale_``/``match_`` scale both parts (each remembers the factor for its reset_parameters).

    Sub-modules: ``sparse`` (BlockSparseLinear, no bias), ``lowrank`` (LowRankLinear, no bias).
    Ungated, both run in one fused kernel call (:func:`pixelfly_lab.ops.matmul.sparse_lowrank_matmul`).
    """

    def __init__(self, in_features: int, out_features: int, layout: torch.Tensor, block_size: int,
                 rank: int = 0, bias: bool = True, gating: bool = False, lowrank_init: str = "svd",
                 backend: str = "auto", device=None, dtype=None):
        super().__init__(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        check_bool("gating", gating)
        check_lowrank_init(lowrank_init)
        self.sparse = BlockSparseLinear(in_features, out_features, layout, block_size, bias=False,
                                        backend=backend, **factory)
        self.lowrank = (LowRankLinear(in_features, out_features, rank, bias=False, init=lowrank_init, **factory)
                        if check_int("rank", rank, 0) else None)
        self.gate = nn.Linear(in_features, 1, **factory) if gating else None
        self._make_bias(bias, factory)
        self.reset_parameters()

    def _reset_weight(self) -> None:
        """Nothing: ``sparse``, ``lowrank`` and ``gate`` reset their own parameters (and scales)."""

    def rescale_(self, c: float, remember: bool = False) -> "SparseLowRankLinear":
        """Scale S and U V^T by ``c`` (each part remembers it with ``remember``); the gate is kept."""
        self.sparse.rescale_(c, remember)
        if self.lowrank is not None:
            self.lowrank.rescale_(c, remember)
        return self

    def weight_std(self) -> float:
        """Standard deviation of the entries of S + U V^T, from the factors (W is not formed).

        sum W = sum S + (1^T U)(V^T 1), sum W^2 = ||S||^2 + 2 <S, U V^T> + <U^T U, V^T V>, where
        <S, U V^T> = sum over kept blocks (i, j) of <S_ij, U_i V_j^T>: a fifth of the work of
        forming W at GPT-2's shapes. A gated layer's S + U V^T (both at full weight) is measured.
        """
        count = self.in_features * self.out_features
        sparse = self.sparse
        with torch.no_grad():
            work = torch.promote_types(sparse.values.dtype, torch.float32)   # bf16 sums lose too much
            values = sparse.values.detach().to(work)
            total, square = values.sum(), values.square().sum()
            if self.lowrank is not None:
                u, v, b = self.lowrank.u.detach().to(work), self.lowrank.v.detach().to(work), sparse.block_size
                rows, cols = registered_layout(sparse.layout_key).layout.nonzero(as_tuple=True)
                u_rows = u.reshape(-1, b, self.rank)[rows.to(u.device)]        # (nnz, b, r): U_i per block
                v_cols = v.reshape(-1, b, self.rank)[cols.to(v.device)]        # (nnz, b, r): V_j per block
                cross = (torch.bmm(values.transpose(1, 2), u_rows) * v_cols).sum()
                total = total + u.sum(0) @ v.sum(0)
                square = square + 2 * cross + ((u.T @ u) * (v.T @ v)).sum()
            variance = (square - total * total / count) / max(count - 1, 1)
            return float(variance.clamp(min=0).sqrt())

    def linear_parts(self) -> list[LinearPart] | None:
        """S's part and U V^T's (None for a gated layer: not linear in x)."""
        if self.gate is not None:
            return None
        parts = [part.prefixed("sparse") for part in self.sparse.linear_parts()]
        return parts + ([] if self.lowrank is None else [part.prefixed("lowrank") for part in self.lowrank.linear_parts()])

    def _project(self, work):
        """S = W0 on the support, U V^T = truncated SVD of the residual, then S refitted to
        W0 - U V^T (which can only lower the error); the residual is (W0 - U V^T) off the support."""
        if self.gate is not None:
            raise ValueError("project_ needs an ungated layer (a gated layer has no dense weight to fit); "
                             "use gating=False")
        remainder = work
        if self.lowrank is not None:
            # U V^T fits W0 off the support; its residual is W0 - U V^T there and -U V^T on it
            on_support = self.sparse.mask().to(work.device)
            remainder = self.lowrank.fit_(work * ~on_support) + work * on_support      # W0 - U V^T
        return self.sparse.fit_(remainder)       # S = the remainder on the support; residual off it

    @property
    def rank(self) -> int:
        return 0 if self.lowrank is None else self.lowrank.rank

    @property
    def backend(self) -> str:
        return self.sparse.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.sparse.backend = value

    def _forward(self, x):
        if self.gate is None:
            u, v = (None, None) if self.lowrank is None else (self.lowrank.u, self.lowrank.v)
            return sparse_lowrank_matmul(x, self.sparse.values, self.sparse.layout, u, v, self.bias,
                                         backend=self.backend, layout_key=self.sparse.layout_key)
        g = torch.sigmoid(self.gate(x))
        y = (1 - g) * self.sparse(x)
        if self.lowrank is not None:
            y = y + g * self.lowrank(x)
        return y if self.bias is None else y + self.bias

    def dense_weight(self):
        if self.gate is not None:
            raise RuntimeError("a gated layer mixes S and U V^T by an input-dependent gate, so it "
                               "has no dense weight; build it with gating=False")
        return self._sum_weight()

    def _sum_weight(self) -> torch.Tensor:
        weight = self.sparse.dense_weight()
        return weight if self.lowrank is None else weight + self.lowrank.dense_weight()

    @property
    def weight(self) -> torch.Tensor:
        """S + U V^T as a detached dense copy (a gated layer's too: both parts at full weight)."""
        return self._sum_weight().detach()

    @property
    def weight_params(self):
        """Sparse blocks + low-rank factors (the gate's in_features + 1 are not counted)."""
        return self.sparse.weight_params + (0 if self.lowrank is None else self.lowrank.weight_params)

    def extra_repr(self):
        return f"{StructuredLinear.extra_repr(self)}, rank={self.rank}, gating={self.gate is not None}"


class PixelflyLinear(SparseLowRankLinear):
    """Pixelfly: flat block butterfly S + low-rank U V^T (Dao, Chen et al. 2022, Sec. 4).

    Give either the hyper-parameters or a budget (mapped by
    :func:`pixelfly_lab.structure.patterns.plan_pixelfly`, which never exceeds it):

        PixelflyLinear(1024, 4096, butterfly_size=16, n_factors=2, rank=32, block_size=32)
        PixelflyLinear(1024, 4096, budget=0.25, block_size=32)

    Args:
        in_features, out_features: sizes, divisible by butterfly_size and block_size.
        butterfly_size, n_factors: the flat butterfly (n_factors factors of strides 1..2^(n-1)).
        rank: low-rank rank (default 0 with explicit hyper-parameters).
        block_size: hardware block edge; 32 matches the released code and GPU tiles.
        budget: fraction of dense parameters, instead of the three above.
        shuffle, global_size: layout options of
            :func:`pixelfly_lab.structure.masks.flat_block_butterfly_layout`.
        bias, gating, lowrank_init, backend: as :class:`SparseLowRankLinear`; the authors'
            released layer is ``gating=True, lowrank_init='kaiming'``, ours defaults to the
            ungated, SVD-initialised sum (why: see :class:`SparseLowRankLinear`).

    Attributes:
        plan: the :class:`pixelfly_lab.structure.patterns.PixelflyPlan` used (budget = exact fraction).
    """

    def __init__(self, in_features: int, out_features: int, *, butterfly_size: int | None = None,
                 n_factors: int | None = None, rank: int | None = None, block_size: int = 32,
                 budget: float | None = None, shuffle: bool = False, global_size: int = 0,
                 bias: bool = True, gating: bool = False, lowrank_init: str = "svd", backend: str = "auto",
                 device=None, dtype=None):
        if budget is not None:
            if butterfly_size is not None or n_factors is not None or rank is not None:
                raise ValueError("give either budget or (butterfly_size, n_factors, rank), not both")
            plan = plan_pixelfly(out_features, in_features, budget, block_size)
            butterfly_size, n_factors, rank = plan.butterfly_size, plan.n_factors, plan.rank
        elif butterfly_size is None or n_factors is None:
            raise ValueError("give budget=..., or butterfly_size=... and n_factors=... (and rank=...)")
        rank = 0 if rank is None else rank
        layout = flat_block_butterfly_layout(out_features, in_features, butterfly_size, n_factors,
                                             block_size, shuffle=shuffle, global_size=global_size)
        super().__init__(in_features, out_features, layout, block_size, rank, bias=bias, gating=gating,
                         lowrank_init=lowrank_init, backend=backend, device=device, dtype=dtype)
        self.butterfly_size, self.n_factors = butterfly_size, n_factors
        self.shuffle, self.global_size = shuffle, global_size
        self.plan = PixelflyPlan(butterfly_size, n_factors, block_size, rank, self.budget)

    def extra_repr(self):
        return (f"{super().extra_repr()}, butterfly_size={self.butterfly_size}, "
                f"n_factors={self.n_factors}, block_size={self.sparse.block_size}"
                + (", shuffle=True" if self.shuffle else "")
                + (f", global_size={self.global_size}" if self.global_size else ""))


def layer_from_pattern(pattern: Pattern, bias: bool = True, backend: str = "auto", *, gating: bool = False,
                       lowrank_init: str = "svd", device=None, dtype=None) -> nn.Module:
    """The layer that implements ``pattern`` (from :func:`pixelfly_lab.structure.patterns.make_pattern`).

    dense -> nn.Linear; Monarch -> MonarchLinear(nblocks); low-rank only -> LowRankLinear;
    layout without rank -> BlockSparseLinear; 'pixelfly' -> PixelflyLinear; any other layout
    with a rank -> SparseLowRankLinear. The layer's weight_params equal ``pattern.params``.
    ``gating`` and ``lowrank_init`` (see :class:`SparseLowRankLinear`) apply to the layers with
    a sparse and a low-rank part ('pixelfly', 'X+lowrank'); ``lowrank_init`` also to 'lowrank';
    the other layers have nothing to gate or no factors to initialise.

    Example:
        >>> from pixelfly_lab.structure.patterns import make_pattern
        >>> layer_from_pattern(make_pattern('pixelfly', 256, 128, 0.3, block_size=16))
        PixelflyLinear(...)
    """
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a pixelfly_lab.structure.patterns.Pattern, got {type(pattern).__name__}")
    p, factory = pattern, {"device": device, "dtype": dtype}
    check_bool("gating", gating)
    check_lowrank_init(lowrank_init)
    mixed = dict(gating=gating, lowrank_init=lowrank_init)
    if p.is_dense:
        return nn.Linear(p.in_features, p.out_features, bias=bias, **factory)
    if p.nblocks:
        return MonarchLinear(p.in_features, p.out_features, p.nblocks, bias=bias, **factory)
    if p.layout is None:
        return LowRankLinear(p.in_features, p.out_features, p.rank, bias=bias, init=lowrank_init, **factory)
    if p.name == "pixelfly" and p.plan is not None:   # a Pixelfly layer even when its plan has rank 0
        return PixelflyLinear(p.in_features, p.out_features, butterfly_size=p.plan.butterfly_size,
                              n_factors=p.plan.n_factors, rank=p.rank, block_size=p.block_size,
                              bias=bias, backend=backend, **mixed, **factory)
    if p.rank == 0:
        return BlockSparseLinear(p.in_features, p.out_features, p.layout, p.block_size, bias=bias,
                                 backend=backend, **factory)
    return SparseLowRankLinear(p.in_features, p.out_features, p.layout, p.block_size, p.rank,
                               bias=bias, backend=backend, **mixed, **factory)
