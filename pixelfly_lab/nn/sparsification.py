"""Swap a model's linear layers for structured ones: the Pixelfly workflow on a whole model.

The paper's workflow (Dao, Chen et al., "Pixelated Butterfly", ICLR 2022, arXiv 2112.00029,
Figure 1 and Sec. 4): for each matmul of a model, allocate a budget by its dimensions and type,
map the budget to hardware-aligned pattern hyper-parameters, and train with that fixed pattern.
Here every chosen linear layer gets the pattern :func:`pixelfly_lab.structure.patterns.make_pattern` plans
for its own (out_features, in_features) at its budget (the planner never exceeds it), and
:func:`pixelfly_lab.nn.layers.layer_from_pattern` builds the layer. Budgets and pattern names can
differ by layer type through name globs, e.g. ``budget={'*attn*': 0.5, '*': 0.25}``.

What counts as a linear layer: :func:`pixelfly_lab.nn.linear_like.linear_layers` (nn.Linear,
Hugging Face's ``Conv1D``, nn.Linear subclasses and structured layers, the last two listed but
not replaced). The report has one row for each.

Initialisation of a replaced layer (``init=``):

* ``'match'`` (default): the layer's own initialisation, rescaled so that its dense-equivalent
  weight has the standard deviation of the weight it replaces. A dense-vs-sparse comparison then
  starts from the same scale (GPT-2 initialises N(0, 0.02), nn.Linear U(+-1/sqrt(in))). The
  layer remembers the factor (and a zero bias), so its ``reset_parameters`` draws the same
  statistics again; on the meta device the std is read when the model is materialised
  (:func:`pixelfly_lab.nn.materialize.materialize`).
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
import warnings
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from pixelfly_lab._checks import check_bool, check_budget, check_choice, check_finite, check_int, check_lowrank_init
from pixelfly_lab.nn.layers import layer_from_pattern
from pixelfly_lab.nn.linear_like import (linear_features, linear_kind, linear_layers, linear_weight, parameter_owners,
                                         turn_off_fast_path)
from pixelfly_lab.structure.patterns import PATTERN_NAMES, make_pattern

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


def _check_block_size(block_size) -> None:
    if block_size != "auto":
        check_int("block_size", block_size)


def _pick_blocks(block_size, out_features: int, in_features: int) -> list[int]:
    """Block sizes to try, largest first: the given one, or every AUTO_BLOCK_SIZES that divides both."""
    if block_size == "auto":
        return [b for b in AUTO_BLOCK_SIZES if out_features % b == 0 and in_features % b == 0]
    return [block_size] if out_features % block_size == 0 and in_features % block_size == 0 else []


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


# notes of layers the settings themselves leave dense (not counted by the "replaced too few" warning)
_ASKED_DENSE = ("no pattern or budget for this layer", "dense pattern", "budget=1: dense")


def _plan(name: str, out_features: int, in_features: int, pattern, budget, block_size, seed: int):
    """(Pattern, '') for the layer, or (None, why it stays dense)."""
    layer_pattern, layer_budget = _per_layer(pattern, name), _per_layer(budget, name)
    if layer_pattern is None or layer_budget is None:
        return None, _ASKED_DENSE[0]
    if layer_pattern == "dense":
        return None, _ASKED_DENSE[1]
    if layer_budget == 1:
        return None, _ASKED_DENSE[2]
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
    ``requires_grad``, mode, device and dtype; and the projection error (NaN unless 'project').

    The new layer is asked to do the work: ``project_`` (init='project'), ``match_layer_`` (init='match',
    remembered by its reset_parameters); on the meta device 'match' waits for the replaced
    layer's initialised std (``defer_match``, done by :func:`pixelfly_lab.nn.materialize.materialize`).
    """
    weight, error = layer.weight, math.nan
    meta = weight.is_meta
    if meta and init == "project":
        raise ValueError(f"init='project' needs the weights of {name!r}, which is on the meta device")
    dense = None if meta else check_finite(f"the weight of layer {name!r}", linear_weight(layer, kind))
    if init == "project":   # every value is written by the projection: build on meta, allocate, project
        new = layer_from_pattern(planned, bias=layer.bias is not None, device="meta", dtype=weight.dtype, **options)
        new.to_empty(device=weight.device)
        error = new.project_(dense)
    else:
        new = layer_from_pattern(planned, bias=layer.bias is not None, device=weight.device, dtype=weight.dtype,
                                 **options)
    if init == "match" and meta:
        new.defer_match(layer)
    elif init == "match":
        new.match_layer_(layer)            # the replaced weight's std, its bias
    elif layer.bias is not None and not meta:
        with torch.no_grad():
            new.bias.copy_(layer.bias)
    if layer.bias is not None:
        new.bias.requires_grad_(layer.bias.requires_grad)
    if not weight.requires_grad:  # frozen stays frozen
        for param_name, param in new.named_parameters():
            if param_name != "bias":
                param.requires_grad_(False)
    return new.train(layer.training), error


def _warn_if_few_replaced(rows: list[dict], structured: list[str]) -> None:
    """One UserWarning when nothing, or fewer than half the layers asked for, was replaced."""
    asked = [row for row in rows if row["note"] != "not selected" and row["name"] not in structured
             and row["note"] not in _ASKED_DENSE]
    replaced = sum(row["replaced"] for row in rows)
    if not rows:
        warnings.warn("sparsify found no linear layer in the model (nn.Linear, Conv1D): nothing replaced",
                      UserWarning, stacklevel=3)
    elif not asked and not any(row["note"] in _ASKED_DENSE for row in rows):
        warnings.warn(f"sparsify replaced nothing: include/exclude selected none of the {len(rows)} linear "
                      f"layers (or they were structured already)", UserWarning, stacklevel=3)
    elif asked and (replaced == 0 or 2 * replaced < len(asked)):
        kept = [row for row in asked if not row["replaced"]]
        reasons = "; ".join(f"{row['name']}: {row['note']}" for row in kept[:3])
        warnings.warn(f"sparsify replaced {replaced} of the {len(asked)} linear layers it was asked to "
                      f"sparsify; {len(kept)} stay dense, e.g. {reasons}", UserWarning, stacklevel=3)


def sparsify(model: nn.Module, pattern: str | Mapping[str, str] = "pixelfly",
             budget: float | Mapping[str, float] = 0.25, include: Selector = None,
             exclude: Selector = None, block_size: int | str = "auto", seed: int = 0, backend: str = "auto",
             init: str = "match", gating: bool = False, lowrank_init: str = "svd",
             progress: bool | None = None) -> pd.DataFrame:
    """Replace ``model``'s linear layers, in place, by structured layers at a parameter budget.

    Args:
        model: any nn.Module (not itself a linear layer: wrap it).
        pattern: a name of :data:`pixelfly_lab.structure.patterns.PATTERN_NAMES`, or {glob: name}
            (first matching glob wins; layers no glob matches stay dense).
        budget: fraction of each layer's dense parameters, a real number in (0, 1] (numpy scalars
            too; the rule of :func:`pixelfly_lab._checks.check_budget`), or {glob: budget}. A
            budget of 1 leaves the layer dense (dense fits in it); above 1 is an error.
        include: which layers to consider: glob(s) on the qualified module name (``'h.*.mlp.*'``)
            or a callable(name, module) -> bool; None = every linear layer. A glob that matches
            no linear layer raises (a typo would otherwise replace nothing, silently).
        exclude: layers to leave dense, same forms and check; applied after ``include``.
        block_size: 'auto' (default) = the largest of :data:`AUTO_BLOCK_SIZES` dividing both
            sizes whose plan fits the budget (the column ``block_size`` says which: 32 where it
            fits, as the released code; a 64-wide MLP gets 16, Mixer-B's 196-token MLP 4), or a
            fixed block edge. A layer a fixed size does not divide, or that the budget cannot
            cover at that size, stays dense and the ``note`` column says why.
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
    :func:`pixelfly_lab.nn.materialize.materialize` (``pl.materialize(model, device)``), which
    initialises the model as its own init would, reads the std ``init='match'`` needs, and
    re-ties shared weights.

    Warns (one UserWarning with the count and the first reasons) when it replaces no layer, or
    fewer than half of the layers the settings asked to sparsify (a fixed ``block_size`` that
    divides nothing, a budget too small for any plan). Raises ValueError naming the layer whose
    weight holds NaN or inf.

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
    if linear_kind(model) is not None:
        raise TypeError(f"model is itself a linear layer ({type(model).__name__}) and cannot be replaced in "
                        "place; wrap it, e.g. nn.Sequential(layer), or use pixelfly_lab.nn.layers.layer_from_pattern")
    _check_block_size(block_size)
    check_int("seed", seed, 0)
    check_choice("init", init, INITS)
    check_bool("gating", gating)
    check_lowrank_init(lowrank_init)
    if gating and init == "project":
        raise ValueError("init='project' needs gating=False: a gated layer has no dense weight to project")
    for value in (pattern.values() if isinstance(pattern, Mapping) else [pattern]):
        if value not in PATTERN_NAMES:
            raise ValueError(f"unknown pattern {value!r}; known: {', '.join(PATTERN_NAMES)}")
    for value in (budget.values() if isinstance(budget, Mapping) else [budget]):
        check_budget(value)
    include_globs, exclude_globs = _globs(include, "include"), _globs(exclude, "exclude")

    layers = linear_layers(model)
    names = [name for name, _ in layers]
    for what, globs in (("include", include_globs), ("exclude", exclude_globs)):
        for glob in globs or ():
            if not any(fnmatchcase(name, glob) for name in names):
                raise ValueError(f"{what} glob {glob!r} matches no linear layer; names look like "
                                 f"{names[:3] if names else '(none: the model has no linear layer)'}")
    owners = parameter_owners(model)
    replacements: dict[int, nn.Module] = {}
    rows, structured = [], []
    bar = tqdm(layers, desc="sparsify", unit="layer", leave=False,
               disable=not (progress if progress is not None else len(layers) > _PROGRESS_LAYERS))
    for index, (name, layer) in enumerate(bar):
        kind = linear_kind(layer)
        out_features, in_features = linear_features(layer, kind)
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
                   note=repr(planned) + ("; meta device: materialise with pixelfly_lab.materialize(model, device)"
                                         if layer.weight.is_meta else ""))
    fast_path = turn_off_fast_path(model, set(replacements))
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
    _warn_if_few_replaced(rows, structured)
    report = pd.DataFrame(rows, columns=_COLUMNS)
    before = int(report["params_before"].sum())
    report.attrs["budget"] = float(report["params_after"].sum() / before) if before else 1.0
    return report
