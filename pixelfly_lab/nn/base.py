"""The base of every structured linear layer: y = x W^T + bias for a structured W.

A structured layer gives its W as a dense (out_features, in_features) tensor through
``dense_weight()`` (the oracle every fast path is tested against) and owns what it is made of:

* ``rescale_(c)`` multiplies W by c (sums scale each term, a product of k factors each factor by
  c^(1/k): :func:`scale_factors_`);
* ``project_(W0)`` sets W to a best fit of a dense W0 on the layer's structure (``fit_``, the same
  fit without checks, is what a layer made of parts asks each part for);
* ``weight_std()`` is the standard deviation of W's entries;
* ``match_(std)`` rescales W to a given standard deviation and *remembers* the factor, so
  ``reset_parameters()`` (after ``to_empty``, in :func:`pixelfly_lab.nn.materialize.materialize`)
  draws the layer's own init times that factor again; ``zero_bias`` makes it draw a zero bias;
  ``match_layer_(replaced)`` is ``match_`` against the layer this one replaces (its std, its bias).

``sparsify`` (:mod:`pixelfly_lab.nn.sparsification`) and the structured NTK ask the layer
through these methods and never test its type.

Construction under ``with torch.device("meta")`` (or ``device='meta'``) allocates nothing:
masks, layouts and plans are index arithmetic on the host, parameters and buffers follow the
ambient device.

Paper: Dao, Chen et al., "Pixelated Butterfly", ICLR 2022, arXiv 2112.00029.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pixelfly_lab._checks import check_input_width, check_int

__all__ = ["StructuredLinear", "LinearPart", "uniform_", "scale_factors_", "ambient_device"]


@dataclass(frozen=True)
class LinearPart:
    """One term of a layer's W = sum of its parts, for code that differentiates W part by part.

    Attributes:
        kind: 'block_sparse' (the parameter ``names[0]``, (nnz, b, b), holds the kept blocks of
            ``layout`` row-major) or 'lowrank' (``names`` = (U, V): W_part = U V^T, U (out, r),
            V (in, r)).
        names: parameter names relative to the layer (``layer.get_parameter(name)``).
        layout: bool (out/b, in/b) host tensor ('block_sparse'), else None.
        block_size: b ('block_sparse'), else None.
    """

    kind: str
    names: tuple[str, ...]
    layout: torch.Tensor | None = None
    block_size: int | None = None

    def prefixed(self, prefix: str) -> "LinearPart":
        """The same part seen from a parent module that holds this layer as ``prefix``."""
        return LinearPart(self.kind, tuple(f"{prefix}.{n}" for n in self.names), self.layout, self.block_size)


def uniform_(tensor: torch.Tensor, bound) -> torch.Tensor:
    """In place U(-bound, bound); ``bound`` may be a tensor broadcast against ``tensor``."""
    with torch.no_grad():
        return tensor.uniform_(-1.0, 1.0).mul_(bound)


def scale_factors_(factors, c: float) -> None:
    """In place: W = F_1 F_2 ... F_k becomes c W by scaling each of the k factors by c^(1/k).

    The one rescale rule of every product layer (U V^T, P L P^T R, butterflies). c = 0 zeroes the
    first factor only, so gradients still reach all of them. k = 2 takes ``math.sqrt`` (correctly
    rounded), other k ``c ** (1/k)``.

    Args:
        factors: the k factor tensors (parameters, or views of one), k >= 1; changed in place.
        c: the factor, a finite float >= 0 (checked by :meth:`StructuredLinear.rescale_`).
    """
    if c == 0:
        factors[0].zero_()
        return
    root = math.sqrt(c) if len(factors) == 2 else c ** (1.0 / len(factors))
    for factor in factors:
        factor.mul_(root)


def ambient_device(device=None) -> torch.device:
    """``device``, or the device a factory call would use now (the ``with torch.device(...)`` context)."""
    return torch.empty(0, device=device).device


class StructuredLinear(nn.Module):
    """Base class: y = x W^T + bias with W structured; subclasses define W.

    Subclasses implement ``_forward(x)``, ``dense_weight()``, ``weight_params``,
    ``_reset_weight()`` (the layer's own init of W), ``_scale_weight(c)`` and ``_project(W0)``;
    ``forward`` checks the input width first, so every layer rejects a wrong width the same way.

    Attributes:
        init_scale: factor on the layer's own init that ``reset_parameters`` applies (1; set by
            :meth:`match_`, i.e. ``sparsify(init='match')``).
        zero_bias: ``reset_parameters`` draws a zero bias instead of nn.Linear's U(+-1/sqrt(in)).
        weight: the dense-equivalent weight, a detached copy, for code that reads ``.weight``
            (Hugging Face's ``init_weights`` writes into it, which leaves the layer as it is).

    Construction on the meta device: ``layer.to_empty(device=...)`` then ``reset_parameters()``
    once on every module (each resets its own direct parameters and buffers, as torch.nn's layers
    do) gives a layer initialised as if built there, ``match_`` included; parts before the layer
    (the eager build's order, what :func:`pixelfly_lab.nn.materialize.materialize` does) gives the
    CPU build's very draws.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = check_int("in_features", in_features)
        self.out_features = check_int("out_features", out_features)
        self.init_scale, self.zero_bias = 1.0, False

    # --- bias -------------------------------------------------------------------------------------
    def _make_bias(self, bias: bool, factory: dict) -> None:
        """The bias parameter (not yet drawn: :meth:`reset_parameters` draws it), or None."""
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)

    def _reset_bias(self) -> None:
        if self.bias is not None:
            if self.zero_bias:
                with torch.no_grad():
                    self.bias.zero_()
            else:
                uniform_(self.bias, 1.0 / math.sqrt(self.in_features))

    # --- initialisation -----------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Re-draw W by the layer's own init times ``init_scale``, and the bias (zero if ``zero_bias``)."""
        self._restore_buffers()
        self._reset_weight()
        if self.init_scale != 1.0:
            with torch.no_grad():
                self._scale_weight(self.init_scale)
        self._reset_bias()

    def _restore_buffers(self) -> None:
        """Write the fixed structure (a layout, a mask) into its buffers again, e.g. after ``to_empty``."""

    def restore_structure_(self) -> "StructuredLinear":
        """Write the fixed structure (layouts, masks) of this layer and its structured parts into their
        buffers again, e.g. after ``to_empty``, so that W can be read; no weight is drawn or changed."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, StructuredLinear):
                    module._restore_buffers()
        return self

    def _reset_weight(self) -> None:
        raise NotImplementedError

    def _scale_weight(self, c: float) -> None:
        raise NotImplementedError

    def rescale_(self, c: float, remember: bool = False) -> "StructuredLinear":
        """Multiply W (not the bias) by ``c`` >= 0 in place; ``remember``: reset_parameters does too.

        Sums scale each term; products (U V^T, P L P^T R, butterflies) scale each of their k
        factors by c^(1/k). For c = 0 only the first factor is zeroed, so gradients reach all.
        """
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
            raise ValueError(f"c must be a finite number >= 0, got {c!r}")
        with torch.no_grad():
            self._scale_weight(float(c))
        if remember:
            self.init_scale *= float(c)
        return self

    def weight_std(self) -> float:
        """Standard deviation (unbiased) of the entries of W = dense_weight()."""
        if self.in_features * self.out_features < 2:
            return 0.0
        with torch.no_grad():
            return float(self.dense_weight().detach().double().std())

    def match_(self, std: float, zero_bias: bool | None = None) -> float:
        """Rescale W to standard deviation ``std`` (init='match'), remembered by reset_parameters.

        Args:
            std: the target standard deviation (>= 0), e.g. the replaced dense weight's.
            zero_bias: if given, set :attr:`zero_bias` (a replaced layer whose bias was zero).

        Returns:
            The factor applied (0 when W is zero).
        """
        current = self.weight_std()
        factor = std / current if current > 0 else 0.0
        self.rescale_(factor, remember=True)
        if zero_bias is not None:
            self.zero_bias = bool(zero_bias)
        return factor

    def match_layer_(self, replaced: nn.Module) -> float:
        """``init='match'`` against the layer this one replaces: :meth:`match_` its weight's std, take its bias.

        W is rescaled to the standard deviation of ``replaced.weight`` (its layout, (out, in) or
        Hugging Face Conv1D's (in, out), does not change the std) and the factor remembered; a
        replaced bias that is all zero is remembered as :attr:`zero_bias`, and the bias is copied.
        What ``sparsify`` does eagerly and :func:`pixelfly_lab.nn.materialize.materialize` after the
        dense init of a model built on the meta device.

        Args:
            replaced: a linear-like module with ``weight`` and ``bias`` (None or a tensor), on a real device.

        Returns:
            The factor applied to W (0 when W is zero).
        """
        weight, bias = replaced.weight.detach(), getattr(replaced, "bias", None)
        zero_bias = bias is not None and not bool(bias.detach().any())
        factor = self.match_(float(weight.std()) if weight.numel() > 1 else 0.0, zero_bias=zero_bias)
        if bias is not None and self.bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias)
        return factor

    def defer_match(self, replaced: nn.Module | None) -> None:
        """Keep the (meta) layer this one replaced, for :func:`pixelfly_lab.nn.materialize.materialize`.

        On the meta device ``init='match'`` has no std to match: materialising initialises the
        replaced layer as the model would (e.g. Hugging Face's ``init_weights``), then calls
        :meth:`match_layer_` with it. Not registered as a sub-module (no parameters, no state).
        """
        self.__dict__["_replaced"] = replaced

    @property
    def deferred_match(self) -> nn.Module | None:
        """The replaced layer whose initialised std :meth:`match_` still waits for (or None)."""
        return self.__dict__.get("_replaced")

    def project_(self, weight: torch.Tensor) -> float:
        """Set W to a best fit of the dense ``weight`` (out, in) on the layer's structure (init='project').

        The fit is the layer's own (:meth:`_project`); it writes every weight value, so the layer
        may come straight from ``to_empty`` (``sparsify(init='project')`` builds it on the meta
        device: no init is drawn to be overwritten). ``init_scale`` returns to 1 (a later
        reset_parameters draws the layer's own init). The bias is left as it is.

        Returns:
            ||weight - W||_F / ||weight||_F (the absolute error for a zero ``weight``).
        """
        shape = (self.out_features, self.in_features)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape:
            raise ValueError(f"weight must be a tensor of shape (out_features, in_features)={shape}, "
                             f"got {tuple(getattr(weight, 'shape', ()))}")
        if weight.is_meta:
            raise ValueError("weight is on the meta device: there are no values to project")
        work = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
        self.restore_structure_()                  # a layer fresh from to_empty has no structure yet
        with torch.no_grad():
            residual = self.fit_(work)
            norm, error = torch.linalg.norm(work), torch.linalg.norm(residual)
        for module in self.modules():              # its parts' too: each draws its own init again
            if isinstance(module, StructuredLinear):
                module.init_scale = 1.0
        return float(error / norm) if norm > 0 else float(error)

    def fit_(self, work: torch.Tensor) -> torch.Tensor:
        """The fit inside :meth:`project_`, without its checks, for a layer that fits its parts.

        Args:
            work: float32/64 (out_features, in_features) on the layer's device (not changed).

        Returns:
            work - W, (out_features, in_features), after writing the layer's best fit W of ``work``
            into its parameters (under no_grad, structure in place: :meth:`project_` sees to both).
        """
        return self._project(work)

    def _project(self, work: torch.Tensor) -> torch.Tensor:
        """Write the fit of ``work`` (float32/64, (out, in)) into the parameters; return work - W."""
        raise NotImplementedError(f"{type(self).__name__} cannot project a dense weight on its structure")

    def linear_parts(self) -> list[LinearPart] | None:
        """W as a sum of block-sparse and low-rank parts (for the structured NTK), or None when
        W is not such a sum (then its derivatives come from autograd)."""
        return None

    # --- forward and what W is ---------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_width(x, self.in_features, type(self).__name__)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight W, (out_features, in_features): y = x W^T + bias."""
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """W as a detached dense (out_features, in_features) copy (writing into it changes nothing)."""
        return self.dense_weight().detach()

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
                f"bias={getattr(self, 'bias', None) is not None}, budget={self.budget:.4f}"
                + (f", init_scale={self.init_scale:.4g}" if self.init_scale != 1.0 else ""))
