"""Swap a model's nn.Linear layers for structured ones: the Pixelfly workflow on a whole model.

The paper's workflow (Dao, Chen et al., "Pixelated Butterfly", ICLR 2022, arXiv 2112.00029,
Figure 1 and Sec. 4): for each matmul of a model, allocate a budget by its dimensions and type,
map the budget to hardware-aligned pattern hyper-parameters, and train with that fixed pattern.
Here every chosen ``nn.Linear`` gets the pattern :func:`pixelfly_lab.patterns.make_pattern`
plans for its own (out_features, in_features) at its budget (the planner never exceeds it), and
:func:`pixelfly_lab.layers.layer_from_pattern` builds the layer. Budgets and pattern names can
differ by layer type through name globs, e.g. ``budget={'*attn*': 0.5, '*': 0.25}``.

Example:
    >>> model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256), nn.Linear(256, 10))
    >>> report = sparsify(model, 'pixelfly', budget=0.25, block_size=32)
    >>> report[['name', 'pattern', 'params_before', 'params_after']].values.tolist()
    [['0', 'pixelfly', 262144, 64768], ['2', 'pixelfly', 262144, 64768], ['3', 'dense', 2560, 2560]]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ._checks import check_budget, check_int
from .layers import layer_from_pattern
from .patterns import PATTERN_NAMES, make_pattern

__all__ = ["sparsify", "linear_layers"]

Selector = str | Sequence[str] | Callable[[str, nn.Module], bool] | None


def _matches(selector: Selector, name: str, module: nn.Module, default: bool) -> bool:
    """Does ``name`` match a glob, any glob of a list, or satisfy a predicate (None -> default)."""
    if selector is None:
        return default
    if callable(selector):
        return bool(selector(name, module))
    globs = [selector] if isinstance(selector, str) else list(selector)
    if not all(isinstance(g, str) for g in globs):
        raise TypeError("include/exclude must be a glob string, a list of globs, or a callable(name, module)")
    return any(fnmatchcase(name, g) for g in globs)


def _per_layer(setting, name: str):
    """A value, or the value of the first glob in a {glob: value} mapping that matches ``name``."""
    if isinstance(setting, Mapping):
        for glob, value in setting.items():
            if fnmatchcase(name, glob):
                return value
        return None  # no rule for this layer: it stays dense
    return setting


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The plain ``nn.Linear`` modules of ``model`` by qualified name (each module once).

    Subclasses are left out on purpose: ``nn.MultiheadAttention.out_proj`` is one, and the
    attention code reads its weight directly, so replacing it would be silently ignored.
    """
    return [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]


def _dense_row(name, layer, pattern_name, note):
    params = layer.in_features * layer.out_features
    return {"name": name, "shape": (layer.out_features, layer.in_features), "pattern": pattern_name,
            "params_before": params, "params_after": params, "budget": 1.0, "replaced": False,
            "layer": type(layer).__name__, "note": note}


def sparsify(model: nn.Module, pattern: str | Mapping[str, str] = "pixelfly",
             budget: float | Mapping[str, float] = 0.25, include: Selector = None,
             exclude: Selector = None, block_size: int = 32, seed: int = 0, backend: str = "auto",
             progress: bool | None = None) -> pd.DataFrame:
    """Replace ``model``'s nn.Linear layers, in place, by structured layers at a parameter budget.

    Args:
        model: any nn.Module (not itself an nn.Linear: wrap it).
        pattern: a name of :data:`pixelfly_lab.patterns.PATTERN_NAMES`, or {glob: name}
            (first matching glob wins; layers no glob matches stay dense).
        budget: fraction of each layer's dense parameters in (0, 1], or {glob: budget}.
        include: which layers to consider: glob(s) on the qualified module name (``'blocks.*.mlp.*'``)
            or a callable(name, module) -> bool; None = every nn.Linear.
        exclude: layers to leave dense, same forms; applied after ``include``.
        block_size: block edge of the layouts. 32 fits CPU GEMM tiles and GPU tensor-core tiles;
            small models want 8 or 16. A layer whose dimensions this does not divide, or that the
            budget cannot cover at this block size, stays dense (the ``note`` column says why).
        seed: seeds random patterns ('random', 'bigbird'); layer i (in model order) uses seed + i
            so that layers do not share one random pattern. New weights are initialised from
            torch's global RNG, like any nn.Module; the old bias is kept.
        backend: kernel backend of the new block-sparse layers (see :mod:`pixelfly_lab.kernels`).
        progress: show a progress bar (default: when there are more than 20 layers).

    Returns:
        DataFrame, one row per nn.Linear considered, in model order: name, shape (out, in),
        pattern, params_before, params_after (weight entries, bias excluded), budget
        (= params_after / params_before), replaced, layer (class of the new layer), note.
        ``df.attrs['budget']`` is the whole set's params_after / params_before.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise TypeError("model is itself an nn.Linear and cannot be replaced in place; wrap it, "
                        "e.g. nn.Sequential(layer), or use pixelfly_lab.layers.layer_from_pattern")
    check_int("block_size", block_size)
    check_int("seed", seed, 0)
    for name_or_map, what in ((pattern, "pattern"), (budget, "budget")):
        for value in (name_or_map.values() if isinstance(name_or_map, Mapping) else [name_or_map]):
            if what == "pattern" and value not in PATTERN_NAMES:
                raise ValueError(f"unknown pattern {value!r}; known: {', '.join(PATTERN_NAMES)}")
            if what == "budget":
                check_budget(value)

    layers = linear_layers(model)
    replacements: dict[int, nn.Module] = {}
    rows = []
    bar = tqdm(layers, desc="sparsify", unit="layer", leave=False,
               disable=not (progress if progress is not None else len(layers) > 20))
    for index, (name, layer) in enumerate(bar):
        if not (_matches(include, name, layer, True) and not _matches(exclude, name, layer, False)):
            rows.append(_dense_row(name, layer, "dense", "not selected"))
            continue
        layer_pattern, layer_budget = _per_layer(pattern, name), _per_layer(budget, name)
        if layer_pattern is None or layer_budget is None or layer_pattern == "dense":
            rows.append(_dense_row(name, layer, "dense", "no pattern or budget for this layer"
                                   if layer_pattern != "dense" else "dense pattern"))
            continue
        if layer.in_features % block_size or layer.out_features % block_size:
            rows.append(_dense_row(name, layer, "dense", f"shape not divisible by block_size={block_size}"))
            continue
        try:
            planned = make_pattern(layer_pattern, layer.out_features, layer.in_features, layer_budget,
                                   block_size=block_size, seed=seed + index)
        except ValueError as err:  # budget too small for this layer at this block size
            rows.append(_dense_row(name, layer, "dense", str(err)))
            continue
        new = layer_from_pattern(planned, bias=layer.bias is not None, backend=backend,
                                 device=layer.weight.device, dtype=layer.weight.dtype)
        if layer.bias is not None:
            with torch.no_grad():
                new.bias.copy_(layer.bias)
        replacements[id(layer)] = new
        rows.append({"name": name, "shape": (layer.out_features, layer.in_features), "pattern": layer_pattern,
                     "params_before": layer.in_features * layer.out_features, "params_after": planned.params,
                     "budget": planned.budget, "replaced": True, "layer": type(new).__name__,
                     "note": repr(planned)})
    # swap every reference (a module registered under two names, e.g. tied, is replaced in both)
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):  # not named_children(): it skips repeats
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    report = pd.DataFrame(rows, columns=["name", "shape", "pattern", "params_before", "params_after",
                                         "budget", "replaced", "layer", "note"])
    before = int(report["params_before"].sum())
    report.attrs["budget"] = float(report["params_after"].sum() / before) if before else 1.0
    return report
