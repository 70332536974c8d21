"""Structured linear layers: masked, block-sparse, low-rank, Pixelfly (sparse + low-rank), Monarch.

Every layer computes y = x W^T + bias like ``nn.Linear`` for a structured W, and gives that W as
a dense (out_features, in_features) tensor through ``dense_weight()``, the oracle every fast path
is tested against. ``weight_params`` counts the stored weight entries (bias excluded) and
``budget`` = weight_params / (in_features * out_features), the quantity
:func:`pixelfly_lab.structure.patterns.make_pattern` budgets. ``ButterflyLinear`` lives in
:mod:`pixelfly_lab.nn.butterfly`, which builds on this module.

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

import math

import torch
import torch.nn.functional as F
from torch import nn

from pixelfly_lab._checks import check_input_width, check_int
from pixelfly_lab.ops.matmul import (BACKENDS, block_sparse_matmul, blocks_to_dense, register_layout, registered_layout,
                      sparse_lowrank_matmul)
from pixelfly_lab.structure.masks import flat_block_butterfly_layout, layout_to_mask
from pixelfly_lab.structure.patterns import Pattern, PixelflyPlan, plan_pixelfly
from pixelfly_lab.structure.projections import lowrank_factors

__all__ = ["LOWRANK_INITS", "StructuredLinear", "MaskedLinear", "BlockSparseLinear", "LowRankLinear",
           "SparseLowRankLinear", "PixelflyLinear", "MonarchLinear",
           "layer_from_pattern"]


def _check_divides(name: str, value: int, in_features: int, out_features: int) -> None:
    if in_features % value or out_features % value:
        raise ValueError(f"{name}={value} must divide in_features={in_features} and "
                         f"out_features={out_features}")


def _uniform_(tensor: torch.Tensor, bound) -> torch.Tensor:
    """In place U(-bound, bound); ``bound`` may be a tensor broadcast against ``tensor``."""
    with torch.no_grad():
        return tensor.uniform_(-1.0, 1.0).mul_(bound)


class StructuredLinear(nn.Module):
    """Base class: y = x W^T + bias with W structured; subclasses define W.

    Subclasses implement ``_forward(x)``, ``dense_weight()`` and ``weight_params``; ``forward``
    checks the input width first, so every layer rejects a wrong width the same way.

    Construction on the meta device: ``layer = PixelflyLinear(..., device='meta')`` allocates
    nothing; ``layer.to_empty(device=...)`` then calling ``reset_parameters()`` on every module
    (``for m in model.modules(): m.reset_parameters()`` where defined; each resets its own direct
    parameters and buffers, as torch.nn's layers do) gives a layer initialised as if built there.
    Fixed structure (layouts, masks) is validated and kept on the host at construction, so no
    forward or backward reads a tensor back to the host.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)

    def _init_bias(self, bias: bool, factory: dict) -> None:
        """Bias like nn.Linear's: U(-1/sqrt(in), 1/sqrt(in)), or None."""
        self._make_bias(bias, factory)
        self._reset_bias()

    def _make_bias(self, bias: bool, factory: dict) -> None:
        """The bias parameter (not yet drawn: :meth:`_reset_bias` draws it), or None."""
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)

    def _reset_bias(self) -> None:
        if self.bias is not None:
            _uniform_(self.bias, 1.0 / math.sqrt(self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_width(x, self.in_features, type(self).__name__)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight W, (out_features, in_features): y = x W^T + bias."""
        raise NotImplementedError

    @property
    def weight_params(self) -> int:
        """Stored weight entries, bias excluded (what a parameter budget counts)."""
        raise NotImplementedError

    @property
    def budget(self) -> float:
        """weight_params / (in_features * out_features): the fraction of a dense layer used."""
        return self.weight_params / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={getattr(self, 'bias', None) is not None}, budget={self.budget:.4f}")


class MaskedLinear(StructuredLinear):
    """Dense storage times a fixed element mask: the slow, obviously correct reference.

    W = weight * mask. Off-mask entries start at zero and receive zero gradient, so optimisers
    with decoupled weight decay (AdamW) keep them at zero.

    Args:
        in_features, out_features: sizes.
        mask: bool (out_features, in_features).
        bias: learn a bias.

    Init: each row r of the kept entries ~ U(-a, a) * sqrt(in / nnz_r) with a = 1/sqrt(in), so
    every output has the variance it would have in a dense nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (out_features, in_features):
            raise ValueError(f"mask must be a tensor of shape (out_features, in_features)="
                             f"{(out_features, in_features)}, got {tuple(getattr(mask, 'shape', ()))}")
        if mask.is_meta:
            raise ValueError("mask must hold values (build it on the CPU); the layer may live on 'meta'")
        # a host copy: reset_parameters restores the buffer after to_empty(), and weight_params
        # needs no device read
        self._mask_source = mask.detach().to("cpu", torch.bool).clone()
        self._nnz = int(self._mask_source.sum())
        self.register_buffer("mask", self._mask_source.to(device=device))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self._make_bias(bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Restore the mask buffer, re-draw the weight (see the class docstring) and the bias."""
        with torch.no_grad():
            self.mask.copy_(self._mask_source)
            nnz_row = self._mask_source.sum(1, keepdim=True).clamp(min=1).to(self.weight.device)
            _uniform_(self.weight, (self.in_features / nnz_row).sqrt() / math.sqrt(self.in_features))
            self.weight.mul_(self.mask)
        self._reset_bias()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        mask = state_dict.get(prefix + "mask")
        if isinstance(mask, torch.Tensor) and not mask.is_meta:  # a new mask: read it once, here
            self._mask_source = mask.detach().to("cpu", torch.bool).clone()
            self._nnz = int(self._mask_source.sum())

    def _forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)

    def dense_weight(self):
        return self.weight * self.mask

    @property
    def weight_params(self):
        return self._nnz


class BlockSparseLinear(StructuredLinear):
    """y = x W^T + bias with W stored as its nonzero (b x b) blocks on a fixed block layout.

    Args:
        in_features, out_features: sizes, divisible by ``block_size``.
        layout: bool (out_features / block_size, in_features / block_size).
        block_size: block edge b.
        bias: learn a bias.
        backend: kernel backend ('auto', 'torch', 'reference', 'triton'; see
            :mod:`pixelfly_lab.ops.matmul`); an attribute, changeable at any time.

    Attributes:
        values: Parameter (nnz, b, b), block k = the k-th True entry of ``layout`` (row-major).
        layout, block_size, backend.

    Init (as the released Pixelfly code): blocks ~ U(-1/sqrt(in), 1/sqrt(in)) like a dense
    layer, then block row i scaled by sqrt(C / nnz_i) (C blocks per row, nnz_i kept), so each
    output's variance matches nn.Linear's.
    """

    def __init__(self, in_features: int, out_features: int, layout: torch.Tensor, block_size: int,
                 bias: bool = True, backend: str = "auto", device=None, dtype=None):
        super().__init__(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        self.block_size = check_int("block_size", block_size)
        _check_divides("block_size", block_size, in_features, out_features)
        shape = (out_features // block_size, in_features // block_size)
        if not isinstance(layout, torch.Tensor) or tuple(layout.shape) != shape:
            raise ValueError(f"layout must be a tensor of shape (out/b, in/b)={shape}, "
                             f"got {tuple(getattr(layout, 'shape', ()))}")
        if layout.is_meta:
            raise ValueError("layout must hold values (build it on the CPU); the layer may live on 'meta'")
        # validated and read to the host once, here: the kernels get its key, so no forward or
        # backward reads the layout back (no device sync; torch.compile traces without breaks)
        self._layout_key = register_layout(layout.to(torch.bool), block_size)
        self.register_buffer("layout", registered_layout(self._layout_key).layout.to(device))
        self.backend = backend
        nnz = registered_layout(self._layout_key).nnz
        self.values = nn.Parameter(torch.empty(nnz, block_size, block_size, **factory))
        self._make_bias(bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Restore the layout buffer, re-draw the blocks (see the class docstring) and the bias."""
        layout = registered_layout(self._layout_key).layout
        row_of_block = layout.nonzero()[:, 0]
        nnz_row = layout.sum(1)[row_of_block].double()
        scale = (layout.shape[1] / nnz_row).sqrt() / math.sqrt(self.in_features)
        with torch.no_grad():
            self.layout.copy_(layout)
            _uniform_(self.values, scale[:, None, None].to(self.values.device, self.values.dtype))
        self._reset_bias()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        layout = state_dict.get(prefix + "layout")
        if isinstance(layout, torch.Tensor) and not layout.is_meta:  # validate a new layout once, here
            key = register_layout(layout.to(torch.bool), self.block_size)
            if tuple(layout.shape) != tuple(self.layout.shape):
                raise ValueError(f"{prefix}layout has shape {tuple(layout.shape)}, the layer's is "
                                 f"{tuple(self.layout.shape)}")
            self._layout_key = key
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __setstate__(self, state):
        """Unpickling (torch.save of a whole model, copy.deepcopy, spawned workers): the layout key
        is this process's, so the layout buffer that came with the state is registered again."""
        super().__setstate__(state)
        if not self.layout.is_meta:
            self._layout_key = register_layout(self.layout, self.block_size)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value

    def _forward(self, x):
        return block_sparse_matmul(x, self.values, self.layout, self.bias, backend=self.backend,
                                   layout_key=self._layout_key)

    def dense_weight(self):
        return blocks_to_dense(self.values, self.layout)

    def mask(self) -> torch.Tensor:
        """bool (out_features, in_features): the element support of W."""
        return layout_to_mask(self.layout, self.block_size)

    @property
    def weight_params(self):
        return self.values.numel()

    def extra_repr(self):
        return (f"{super().extra_repr()}, block_size={self.block_size}, "
                f"blocks={registered_layout(self._layout_key).nnz}/{self.layout.numel()}, "
                f"backend={self.backend!r}")


LOWRANK_INITS = ("svd", "kaiming")


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
        if init not in LOWRANK_INITS:
            raise ValueError(f"init must be one of {LOWRANK_INITS}, got {init!r}")
        self.init = init
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.v = nn.Parameter(torch.empty(in_features, rank, **factory))
        self._make_bias(bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw U, V (by ``init``; 'svd' computes on the host) and the bias."""
        rank, in_features, out_features = self.rank, self.in_features, self.out_features
        if self.init == "kaiming":
            _uniform_(self.v, 1.0 / math.sqrt(in_features))
            _uniform_(self.u, 1.0 / math.sqrt(rank))
            self._reset_bias()
            return
        with torch.no_grad():
            # on the host in float32 (float64 for a float64 layer), randomised at every size: an
            # exact float64 SVD of a 3072x768 matrix costs ~1 s, a third of a minute per GPT-2 in
            # sparsify, for ~25 of its 768 singular vectors
            work = torch.float64 if self.u.dtype == torch.float64 else torch.float32
            w0 = _uniform_(torch.empty(out_features, in_features, dtype=work), 1.0 / math.sqrt(in_features))
            u, v = lowrank_factors(w0, rank)
            self.u.copy_(u)
            self.v.copy_(v)
        self._reset_bias()

    def _forward(self, x):
        return F.linear(x @ self.v, self.u, self.bias)

    def dense_weight(self):
        return self.u @ self.v.T

    @property
    def weight_params(self):
        return self.rank * (self.in_features + self.out_features)

    def extra_repr(self):
        return f"{super().extra_repr()}, rank={self.rank}" + (f", init={self.init!r}" if self.init != "svd" else "")


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

    Sub-modules: ``sparse`` (BlockSparseLinear, no bias), ``lowrank`` (LowRankLinear, no bias).
    Ungated, both run in one fused kernel call (:func:`pixelfly_lab.ops.matmul.sparse_lowrank_matmul`).
    """

    def __init__(self, in_features: int, out_features: int, layout: torch.Tensor, block_size: int,
                 rank: int = 0, bias: bool = True, gating: bool = False, lowrank_init: str = "svd",
                 backend: str = "auto", device=None, dtype=None):
        super().__init__(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        if not isinstance(gating, bool):
            raise TypeError(f"gating must be a bool, got {type(gating).__name__}")
        if lowrank_init not in LOWRANK_INITS:
            raise ValueError(f"lowrank_init must be one of {LOWRANK_INITS}, got {lowrank_init!r}")
        self.sparse = BlockSparseLinear(in_features, out_features, layout, block_size, bias=False,
                                        backend=backend, **factory)
        self.lowrank = (LowRankLinear(in_features, out_features, rank, bias=False, init=lowrank_init, **factory)
                        if check_int("rank", rank, 0) else None)
        self.gate = nn.Linear(in_features, 1, **factory) if gating else None
        self._init_bias(bias, factory)

    def reset_parameters(self) -> None:
        """Re-draw the bias; ``sparse``, ``lowrank`` and ``gate`` reset their own parameters."""
        self._reset_bias()

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
                                         backend=self.backend, layout_key=self.sparse._layout_key)
        g = torch.sigmoid(self.gate(x))
        y = (1 - g) * self.sparse(x)
        if self.lowrank is not None:
            y = y + g * self.lowrank(x)
        return y if self.bias is None else y + self.bias

    def dense_weight(self):
        if self.gate is not None:
            raise RuntimeError("a gated layer mixes S and U V^T by an input-dependent gate, so it "
                               "has no dense weight; build it with gating=False")
        weight = self.sparse.dense_weight()
        return weight if self.lowrank is None else weight + self.lowrank.dense_weight()

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
                + (f", shuffle=True" if self.shuffle else "")
                + (f", global_size={self.global_size}" if self.global_size else ""))


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
    layer's.

    Attributes:
        r_blocks: Parameter (nb, q, m); l_blocks: Parameter (nb, s, q).

    Example:
        >>> MonarchLinear(4096, 1024, nblocks=4).weight_params == (1024 * 4096 + 1024 ** 2) // 4
        True
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features)
        factory = {"device": device, "dtype": dtype}
        self.nblocks = check_int("nblocks", nblocks)
        _check_divides("nblocks", nblocks, in_features, out_features)
        m, s = in_features // nblocks, out_features // nblocks
        q = min(in_features, out_features) // nblocks
        self.r_blocks = nn.Parameter(torch.empty(nblocks, q, m, **factory))
        self.l_blocks = nn.Parameter(torch.empty(nblocks, s, q, **factory))
        self._make_bias(bias, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw R, L (see the class docstring) and the bias."""
        m, q = self.r_blocks.shape[2], self.r_blocks.shape[1]
        _uniform_(self.r_blocks, math.sqrt(3.0 / m))
        _uniform_(self.l_blocks, 1.0 / math.sqrt(q))
        self._reset_bias()

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
        d, c = torch.meshgrid(torch.arange(nb), torch.arange(q), indexing="ij")
        perm_mid = (c * nb + d).flatten()       # (P^T u)[d*q + c] = u[c*nb + d]
        e, d2 = torch.meshgrid(torch.arange(s), torch.arange(nb), indexing="ij")
        perm_out = (d2 * s + e).flatten()       # (P y)[e*nb + d] = y[d*s + e]
        dev = left.device
        return left[perm_out.to(dev)] @ right[perm_mid.to(dev)]

    @property
    def weight_params(self):
        return self.r_blocks.numel() + self.l_blocks.numel()

    def extra_repr(self):
        return f"{super().extra_repr()}, nblocks={self.nblocks}"


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
    if not isinstance(gating, bool):
        raise TypeError(f"gating must be a bool, got {type(gating).__name__}")
    if lowrank_init not in LOWRANK_INITS:
        raise ValueError(f"lowrank_init must be one of {LOWRANK_INITS}, got {lowrank_init!r}")
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
