"""Swap a model's linear layers for structured ones: the Pixelfly workflow on a whole model.

The paper's workflow (Dao, Chen et al., "Pixelated Butterfly", ICLR 2022, arXiv 2112.00029,
Figure 1 and Sec. 4): for each matmul of a model, allocate a budget by its dimensions and type,
map the budget to hardware-aligned pattern hyper-parameters, and train with that fixed pattern.
Here every chosen linear layer gets the pattern :func:`pixelfly_lab.structure.patterns.make_pattern` plans
for its own (out_features, in_features) at its budget (the planner never exceeds it), and
:func:`pixelfly_lab.nn.layers.layer_from_pattern` builds the layer. Budgets and pattern names can
differ by layer type through name globs, e.g. ``budget={'*attn*': 0.5, '*': 0.25}``.

What counts as a linear layer (:func:`linear_layers`): ``nn.Linear``; Hugging Face's ``Conv1D``
(GPT-2 and kin: y = x W + b with W stored (in, out) and ``nf`` = out), recognised by its shape
and attribute, so ``transformers`` is never imported; subclasses of nn.Linear (listed, not
replaced: ``nn.MultiheadAttention`` hands ``out_proj.weight`` straight to its kernel); and layers
that are already structured (listed, not re-planned). The report has one row for each.

Initialisation of a replaced layer (``init=``):

* ``'match'`` (default): the layer's own initialisation, rescaled so that its dense-equivalent
  weight has the standard deviation of the weight it replaces. A dense-vs-sparse comparison then
  starts from the same scale (GPT-2 initialises N(0, 0.02), nn.Linear U(+-1/sqrt(in))).
* ``'kaiming'``: the structured layer's own initialisation (kaiming-uniform-like, as the
  authors' layers), whatever the replaced layer held.
* ``'project'``: the replaced layer's current (for example pretrained) weight W0 projected onto
  the pattern: S = W0 on the support, U V^T = rank-r truncated SVD of the residual W0 - S
  (randomised, :func:`torch.svd_lowrank`), then S refitted to W0 - U V^T on the support, which
  can only lower the error. The report gives ||W0 - W||_F / ||W0||_F per layer.

Example:
    >>> model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256), nn.Linear(256, 10))
    >>> report = sparsify(model, 'pixelfly', budget=0.25, block_size=32)
    >>> report[['name', 'pattern', 'params_before', 'params_after']].values.tolist()
    [['0', 'pixelfly', 262144, 64768], ['2', 'pixelfly', 262144, 64768], ['3', 'dense', 2560, 2560]]
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from pixelfly_lab._checks import check_int
from pixelfly_lab.ops.matmul import dense_to_blocks
from pixelfly_lab.nn.layers import (LOWRANK_INITS, BlockSparseLinear, LowRankLinear, MonarchLinear, SparseLowRankLinear,
                     StructuredLinear, layer_from_pattern)
from pixelfly_lab.structure.patterns import PATTERN_NAMES, make_pattern
from pixelfly_lab.structure.projections import lowrank_factors, monarch_project

__all__ = ["sparsify", "linear_layers", "INITS", "AUTO_BLOCK_SIZES"]

Selector = str | Sequence[str] | Callable[[str, nn.Module], bool] | None

INITS = ("match", "kaiming", "project")

# Blocks tried by block_size='auto', largest first. 32 is the released code's block and fits CPU
# GEMM tiles and GPU tensor-core tiles; below 4 a block-sparse layer is an unstructured one in
# disguise and runs no faster than dense, so such a layer stays dense.
AUTO_BLOCK_SIZES = (32, 16, 8, 4)

# Above this many candidate layers the progress bar shows by default (a GPT-2-small has 48).
_PROGRESS_LAYERS = 20


_COLUMNS = ["name", "source", "shape", "pattern", "block_size", "params_before", "params_after", "budget",
            "replaced", "layer", "projection_error", "note"]


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` by duck typing: y = x W + b, W (in, out), ``nf`` = out, no nn.Linear."""
    weight, nf = getattr(module, "weight", None), getattr(module, "nf", None)
    return (not isinstance(module, nn.Linear) and isinstance(nf, int) and isinstance(weight, torch.Tensor)
            and weight.dim() == 2 and weight.shape[1] == nf)


def _kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', 'subclass' (of nn.Linear), 'structured' or None (not linear-like)."""
    if type(module) is nn.Linear:
        return "linear"
    if isinstance(module, StructuredLinear):
        return "structured"
    if isinstance(module, nn.Linear):
        return "subclass"
    return "conv1d" if _is_conv1d(module) else None


def _features(module: nn.Module, kind: str) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like module."""
    if kind == "conv1d":
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def _dense_weight(module: nn.Module, kind: str) -> torch.Tensor:
    """W (out, in) with y = x W^T + b."""
    return module.weight.t() if kind == "conv1d" else module.weight


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every linear-like module of ``model`` by qualified name, in model order, each module once.

    Linear-like: nn.Linear and its subclasses, Hugging Face ``Conv1D`` (weight (in, out),
    attribute ``nf``) and structured layers (:class:`pixelfly_lab.nn.layers.StructuredLinear`);
    the modules inside a structured layer (a gate) are its own business and are not listed.
    """
    found, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        kind = _kind(module)
        if kind is not None and module is not model:
            found.append((name, module))
        if kind == "structured":
            inside.append(name + ".")
    return found


def _globs(selector: Selector, what: str) -> list[str] | None:
    """The globs of an include/exclude selector (None for a callable or None)."""
    if selector is None or callable(selector):
        return None
    globs = [selector] if isinstance(selector, str) else list(selector)
    if not globs or not all(isinstance(g, str) for g in globs):
        raise TypeError(f"{what} must be a glob string, a non-empty list of globs, or a callable(name, module)")
    return globs


def _matches(selector: Selector, globs: list[str] | None, name: str, module: nn.Module, default: bool) -> bool:
    if selector is None:
        return default
    if globs is None:
        return bool(selector(name, module))
    return any(fnmatchcase(name, g) for g in globs)


def _per_layer(setting, name: str):
    """A value, or the value of the first glob in a {glob: value} mapping that matches ``name``."""
    if isinstance(setting, Mapping):
        for glob, value in setting.items():
            if fnmatchcase(name, glob):
                return value
        return None  # no rule for this layer: it stays dense
    return setting


def _check_budget(value) -> float:
    """Any real number > 0 (np.float32, Fraction, int...); >= 1 means 'leave dense'."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"budget must be a real number > 0 (or a {{glob: budget}} mapping), "
                        f"got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"budget must be > 0 (a fraction of the dense parameters; >= 1 leaves a layer "
                         f"dense), got {value}")
    return value


def _check_block_size(block_size) -> None:
    if block_size != "auto":
        check_int("block_size", block_size)


def _pick_blocks(block_size, out_features: int, in_features: int) -> list[int]:
    """Block sizes to try, largest first: the given one, or every AUTO_BLOCK_SIZES that divides both."""
    if block_size == "auto":
        return [b for b in AUTO_BLOCK_SIZES if out_features % b == 0 and in_features % b == 0]
    return [block_size] if out_features % block_size == 0 and in_features % block_size == 0 else []


def _owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> every (module name, module) that registers it (repeats included)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append((name, module))
    return owners


def _scale_(layer: nn.Module, c: float) -> None:
    """Multiply ``layer``'s dense-equivalent weight by c >= 0 in place (bias untouched).

    Sums scale each term; products U V^T and P L P^T R scale both factors by sqrt(c). For c = 0
    only the first factor is zeroed, so that gradients still reach both factors.
    """
    with torch.no_grad():
        if isinstance(layer, SparseLowRankLinear):
            _scale_(layer.sparse, c)
            if layer.lowrank is not None:
                _scale_(layer.lowrank, c)
        elif isinstance(layer, BlockSparseLinear):
            layer.values.mul_(c)
        elif isinstance(layer, (LowRankLinear, MonarchLinear)):
            first, second = ((layer.u, layer.v) if isinstance(layer, LowRankLinear)
                             else (layer.l_blocks, layer.r_blocks))
            first.mul_(math.sqrt(c))
            if c > 0:
                second.mul_(math.sqrt(c))
        else:
            raise TypeError(f"init='match' does not know how to scale a {type(layer).__name__}")


def _project_(layer: nn.Module, target: torch.Tensor) -> float:
    """Set ``layer``'s weight to a projection of ``target`` (out, in) on its structure.

    Returns ||target - W||_F / ||target||_F (0 for a zero target). With a sparse part, S equals
    target - U V^T on its support, so the residual is (target - U V^T) off the support: no need
    to form W again.
    """
    work = target.detach().to(torch.float64 if target.dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        if isinstance(layer, (SparseLowRankLinear, BlockSparseLinear)):
            if getattr(layer, "gate", None) is not None:
                raise ValueError("init='project' needs ungated layers (a gated layer has no dense "
                                 "weight to match); use gating=False")
            sparse = layer.sparse if isinstance(layer, SparseLowRankLinear) else layer
            off_support = ~sparse.mask().to(work.device)
            remainder = work
            if getattr(layer, "lowrank", None) is not None:
                u, v = lowrank_factors(work * off_support, layer.rank)   # residual of S = W0 on the support
                layer.lowrank.u.copy_(u)
                layer.lowrank.v.copy_(v)
                remainder = work - u @ v.T                               # refit S to what U V^T leaves
            sparse.values.copy_(dense_to_blocks(remainder, sparse.layout, sparse.block_size))
            residual = remainder * off_support
        elif isinstance(layer, LowRankLinear):
            u, v = lowrank_factors(work, layer.rank)
            layer.u.copy_(u)
            layer.v.copy_(v)
            residual = work - u @ v.T
        elif isinstance(layer, MonarchLinear):
            left, right = monarch_project(work, layer.nblocks)
            layer.l_blocks.copy_(left)
            layer.r_blocks.copy_(right)
            residual = work - layer.dense_weight().to(work.dtype)
        else:
            raise TypeError(f"init='project' does not know how to project onto a {type(layer).__name__}")
        norm, error = torch.linalg.norm(work), torch.linalg.norm(residual)
    return float(error / norm) if norm > 0 else float(error)


def _weight_std(layer: nn.Module) -> float:
    """Standard deviation (unbiased) of the layer's dense-equivalent weight W.

    For S + U V^T it comes from the factors, without forming W (a fifth of the work at GPT-2's
    shapes): sum W = sum S + (1^T U)(V^T 1), sum W^2 = ||S||^2 + 2 <S, U V^T> + <U^T U, V^T V>,
    where <S, U V^T> = sum over kept blocks (i, j) of <S_ij, U_i V_j^T>. A gated layer has no
    dense weight; its S + U V^T (both parts at full weight) is what is measured.
    """
    count = layer.in_features * layer.out_features
    if not isinstance(layer, SparseLowRankLinear):
        return float(layer.dense_weight().detach().double().std()) if count > 1 else 0.0
    sparse = layer.sparse
    work = torch.promote_types(sparse.values.dtype, torch.float32)   # bf16 sums lose too much
    values = sparse.values.detach().to(work)
    total, square = values.sum(), values.square().sum()
    if layer.lowrank is not None:
        u, v, b = layer.lowrank.u.detach().to(work), layer.lowrank.v.detach().to(work), sparse.block_size
        rows, cols = sparse.layout.nonzero(as_tuple=True)
        u_rows = u.reshape(-1, b, layer.rank)[rows]                     # (nnz, b, r): U_i per block
        v_cols = v.reshape(-1, b, layer.rank)[cols]                     # (nnz, b, r): V_j per block
        cross = (torch.bmm(values.transpose(1, 2), u_rows) * v_cols).sum()
        total = total + u.sum(0) @ v.sum(0)
        square = square + 2 * cross + ((u.T @ u) * (v.T @ v)).sum()
    variance = (square - total * total / count) / max(count - 1, 1)
    return float(variance.clamp(min=0).sqrt())


def _initialise(new: nn.Module, old_weight: torch.Tensor, init: str) -> float:
    """Apply ``init`` to the freshly built ``new``; returns the projection error (NaN unless 'project')."""
    if init == "project":
        return _project_(new, old_weight)
    if init == "match":
        with torch.no_grad():
            target = float(old_weight.detach().std()) if old_weight.numel() > 1 else 0.0
            current = _weight_std(new)
            _scale_(new, target / current if current > 0 else 0.0)
    return math.nan


def _fast_path_notes(model: nn.Module, replaced: set[int]) -> dict[int, str]:
    """Turn off PyTorch's fused Transformer fast path where a replaced layer would be read by it.

    ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder`` on its first layer) hand
    ``linear1.weight`` / ``linear2.weight`` to one fused kernel in eval mode under no_grad; a
    structured layer has no ``.weight``. Setting ``activation_relu_or_gelu = 0`` (read only by
    the fast-path check; the slow path calls ``self.activation``) and ``use_nested_tensor =
    False`` sends those modules down the ordinary path, which calls the layers. Returns
    {id(replaced layer): note}.
    """
    notes = {}
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer):
            touched = [m for m in (module.linear1, module.linear2) if id(m) in replaced]
            if touched:
                module.activation_relu_or_gelu = 0
                for layer in touched:
                    notes[id(layer)] = ("fused fast path of its nn.TransformerEncoderLayer turned off "
                                        "(it reads linear1/linear2.weight)")
        if isinstance(module, nn.TransformerEncoder) and any(
                id(m) in replaced for layer in module.layers for m in (layer.linear1, layer.linear2)):
            module.use_nested_tensor = False
    return notes


def _why_kept(name: str, layer: nn.Module, kind: str, owners: dict, include_globs: list[str] | None) -> str:
    """Why a selected layer cannot be replaced ('' when it can); raises for a tied layer asked for by name."""
    if kind == "structured":
        return ("already structured: left as is (sparsify does not re-plan; sparsify the dense model to "
                "change the plan)")
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        return "lazy layer with no shape yet: run one forward pass before sparsify; left dense"
    if kind == "subclass" and parametrize.is_parametrized(layer):
        return "its weight is computed by torch.nn.utils.parametrize, which a structured layer would drop; left dense"
    if kind == "subclass":
        return (f"{type(layer).__name__} (an nn.Linear subclass) is read directly by its owner"
                + (": nn.MultiheadAttention passes out_proj.weight to its kernel"
                   if name.rsplit(".", 1)[-1] == "out_proj" else "") + "; left dense")
    tied = [other for other, module in owners.get(id(layer.weight), []) if module is not layer]
    if tied and include_globs is not None and name in include_globs:
        raise ValueError(f"layer {name!r} was asked for by name in include, but its weight is tied to "
                         f"{tied[0]!r} (shared parameter); sparsify cannot replace a tied weight "
                         f"without breaking the tie: untie it first or leave it out")
    return f"tied to {tied[0]}: left dense (its weight is shared)" if tied else ""


def _plan(name: str, out_features: int, in_features: int, pattern, budget, block_size, seed: int):
    """(Pattern, '') for the layer, or (None, why it stays dense)."""
    layer_pattern, layer_budget = _per_layer(pattern, name), _per_layer(budget, name)
    if layer_pattern is None or layer_budget is None:
        return None, "no pattern or budget for this layer"
    if layer_pattern == "dense":
        return None, "dense pattern"
    if layer_budget >= 1:
        return None, f"budget={float(layer_budget):g} >= 1: dense"
    blocks = _pick_blocks(block_size, out_features, in_features)
    if not blocks:
        return None, (f"shape {out_features}x{in_features} not divisible by block_size={block_size}"
                      if block_size != "auto" else f"no block of {AUTO_BLOCK_SIZES} divides {out_features}x{in_features}")
    reasons = []
    for block in blocks:
        try:
            return make_pattern(layer_pattern, out_features, in_features, float(layer_budget), block_size=block,
                                seed=seed), ""
        except ValueError as err:  # budget too small for this layer at this block size
            reasons.append(str(err))
    return None, "; ".join(reasons)


def _build(name: str, layer: nn.Module, kind: str, planned, init: str, **options) -> tuple[nn.Module, float]:
    """The structured layer for ``planned``, initialised by ``init``, with ``layer``'s bias,
    ``requires_grad``, mode, device and dtype; and the projection error (NaN unless 'project')."""
    weight, error = layer.weight, math.nan
    if init == "project":  # U and V are overwritten: the cheap kaiming draw, not an SVD
        options["lowrank_init"] = "kaiming"
        if weight.is_meta:
            raise ValueError(f"init='project' needs the weights of {name!r}, which is on the meta device")
    new = layer_from_pattern(planned, bias=layer.bias is not None, device=weight.device, dtype=weight.dtype,
                             **options)
    if not weight.is_meta:
        error = _initialise(new, _dense_weight(layer, kind), init)
    if layer.bias is not None:
        with torch.no_grad():
            if not weight.is_meta:
                new.bias.copy_(layer.bias)
        new.bias.requires_grad_(layer.bias.requires_grad)
    if not weight.requires_grad:  # frozen stays frozen
        for param_name, param in new.named_parameters():
            if param_name != "bias":
                param.requires_grad_(False)
    return new.train(layer.training), error


def sparsify(model: nn.Module, pattern: str | Mapping[str, str] = "pixelfly",
             budget: float | Mapping[str, float] = 0.25, include: Selector = None,
             exclude: Selector = None, block_size: int | str = 32, seed: int = 0, backend: str = "auto",
             init: str = "match", gating: bool = False, lowrank_init: str = "svd",
             progress: bool | None = None) -> pd.DataFrame:
    """Replace ``model``'s linear layers, in place, by structured layers at a parameter budget.

    Args:
        model: any nn.Module (not itself a linear layer: wrap it).
        pattern: a name of :data:`pixelfly_lab.structure.patterns.PATTERN_NAMES`, or {glob: name}
            (first matching glob wins; layers no glob matches stay dense).
        budget: fraction of each layer's dense parameters, a real number > 0 (numpy scalars
            too), or {glob: budget}. A budget >= 1 leaves the layer dense (dense fits in it).
        include: which layers to consider: glob(s) on the qualified module name (``'h.*.mlp.*'``)
            or a callable(name, module) -> bool; None = every linear layer. A glob that matches
            no linear layer raises (a typo would otherwise replace nothing, silently).
        exclude: layers to leave dense, same forms and check; applied after ``include``.
        block_size: block edge of the layouts, or 'auto' = the largest of :data:`AUTO_BLOCK_SIZES`
            dividing both sizes whose plan fits the budget (the column ``block_size`` says which;
            Mixer-B's 196-token MLP gets 4). 32 fits CPU GEMM tiles and GPU tensor-core tiles;
            small models want 8 or 16. A layer this does not divide, or that the budget cannot
            cover at this block size, stays dense and the ``note`` column says why.
        seed: seeds random patterns ('random', 'bigbird'); layer i (in model order) uses seed + i
            so that layers do not share one random pattern. New weights come from torch's global
            RNG, like any nn.Module's.
        backend: kernel backend of the new block-sparse layers (see :mod:`pixelfly_lab.ops.matmul`).
        init: 'match' (default, the replaced weight's std), 'kaiming' (the layer's own init) or
            'project' (the replaced weight projected on the pattern); see the module docstring.
        gating, lowrank_init: options of the layers with a sparse and a low-rank part, passed to
            :func:`pixelfly_lab.nn.layers.layer_from_pattern` (the authors' layer is gated with
            kaiming factors; ours defaults to the ungated sum with SVD factors). 'match' scales a
            gated layer's S + U V^T; 'project' needs gating=False.
        progress: show a progress bar (default: when there are more than 20 linear layers).

    Kept from each replaced layer: its bias, ``requires_grad`` (frozen layers stay frozen),
    train/eval mode, dtype and device. On the meta device no value is computed: materialise with
    ``model.to_empty(device=...)`` and each module's ``reset_parameters()``.

    Left dense, with the reason in ``note``: a layer whose weight is tied to another module
    ("tied to <name>", e.g. GPT-2's lm_head and wte; naming it exactly in ``include`` raises),
    nn.Linear subclasses (``nn.MultiheadAttention.out_proj``; parametrized layers), layers
    already structured (not re-planned: sparsify the dense model again to change a plan; a
    warning lists them).
    ``nn.TransformerEncoderLayer``'s fused eval fast path reads ``linear1.weight``; it is turned
    off for the layers concerned (noted), so eval and no_grad forwards keep working.

    Returns:
        DataFrame, one row per linear-like layer, in model order: name, source (its class),
        shape (out, in), pattern, block_size, params_before, params_after (weight entries, bias
        excluded), budget (= params_after / params_before), replaced, layer (class of the layer
        now in place), projection_error (init='project'; else NaN), note.
        ``df.attrs['budget']`` is the whole set's params_after / params_before.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if _kind(model) is not None:
        raise TypeError(f"model is itself a linear layer ({type(model).__name__}) and cannot be replaced in "
                        "place; wrap it, e.g. nn.Sequential(layer), or use pixelfly_lab.nn.layers.layer_from_pattern")
    _check_block_size(block_size)
    check_int("seed", seed, 0)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(gating, bool):
        raise TypeError(f"gating must be a bool, got {type(gating).__name__}")
    if lowrank_init not in LOWRANK_INITS:
        raise ValueError(f"lowrank_init must be one of {LOWRANK_INITS}, got {lowrank_init!r}")
    if gating and init == "project":
        raise ValueError("init='project' needs gating=False: a gated layer has no dense weight to project")
    for value in (pattern.values() if isinstance(pattern, Mapping) else [pattern]):
        if value not in PATTERN_NAMES:
            raise ValueError(f"unknown pattern {value!r}; known: {', '.join(PATTERN_NAMES)}")
    for value in (budget.values() if isinstance(budget, Mapping) else [budget]):
        _check_budget(value)
    include_globs, exclude_globs = _globs(include, "include"), _globs(exclude, "exclude")

    layers = linear_layers(model)
    names = [name for name, _ in layers]
    for what, globs in (("include", include_globs), ("exclude", exclude_globs)):
        for glob in globs or ():
            if not any(fnmatchcase(name, glob) for name in names):
                raise ValueError(f"{what} glob {glob!r} matches no linear layer; names look like "
                                 f"{names[:3] if names else '(none: the model has no linear layer)'}")
    owners = _owners(model)
    replacements: dict[int, nn.Module] = {}
    rows, structured = [], []
    bar = tqdm(layers, desc="sparsify", unit="layer", leave=False,
               disable=not (progress if progress is not None else len(layers) > _PROGRESS_LAYERS))
    for index, (name, layer) in enumerate(bar):
        kind = _kind(layer)
        out_features, in_features = _features(layer, kind)
        row = {"name": name, "source": type(layer).__name__, "shape": (out_features, in_features),
               "pattern": "dense", "block_size": None, "params_before": out_features * in_features,
               "params_after": out_features * in_features, "budget": 1.0, "replaced": False,
               "layer": type(layer).__name__, "projection_error": math.nan, "note": ""}
        rows.append(row)
        if kind == "structured":
            row.update(pattern="structured", params_after=layer.weight_params, budget=layer.budget)
        if not (_matches(include, include_globs, name, layer, True)
                and not _matches(exclude, exclude_globs, name, layer, False)):
            row["note"] = "not selected"
            continue
        if kind == "structured":
            structured.append(name)
        row["note"] = _why_kept(name, layer, kind, owners, include_globs)
        if row["note"]:
            continue
        planned, row["note"] = _plan(name, out_features, in_features, pattern, budget, block_size, seed + index)
        if planned is None:
            continue
        new, row["projection_error"] = _build(name, layer, kind, planned, init, backend=backend, gating=gating,
                                              lowrank_init=lowrank_init)
        replacements[id(layer)] = new
        row.update(pattern=planned.name, block_size=planned.block_size, params_after=planned.params,
                   budget=planned.budget, replaced=True, layer=type(new).__name__,
                   note=repr(planned) + ("; meta device: materialise with to_empty() + reset_parameters()"
                                         if layer.weight.is_meta else ""))
    fast_path = _fast_path_notes(model, set(replacements))
    for row, (_, layer) in zip(rows, layers):
        if id(layer) in fast_path:
            row["note"] += "; " + fast_path[id(layer)]
    # swap every reference (a module registered under two names, e.g. shared, is replaced in both)
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):  # not named_children(): it skips repeats
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    if structured:
        warnings.warn(f"sparsify left {len(structured)} already structured layer(s) as they are "
                      f"(not re-planned): {structured[:5]}", stacklevel=2)
    report = pd.DataFrame(rows, columns=_COLUMNS)
    before = int(report["params_before"].sum())
    report.attrs["budget"] = float(report["params_after"].sum() / before) if before else 1.0
    return report
