"""Materialise a model built on the meta device: allocate, initialise as the eager build would, re-tie.

Large models are built under ``with torch.device("meta")`` (no memory, no init) and then
allocated. ``model.to_empty(device=...)`` alone leaves every value undefined and unties shared
weights (each module gets its own new tensor); :func:`materialize` does the whole job:

1. structured layers whose ``init='match'`` waited for a std (``sparsify`` on the meta device,
   :meth:`pixelfly_lab.nn.base.StructuredLinear.defer_match`) are swapped back for the dense
   layers they replaced, for the time of the dense init;
2. ``to_empty(device)``, then the shared parameters (GPT-2's ``lm_head`` and ``wte``) are tied
   again as they were;
3. the dense init: the model's own ``init_weights()`` where it has one (Hugging Face models;
   it ties too; the structured layers' layouts are written back first, since it reads their
   ``.weight``), else ``reset_parameters()`` of every module that has one, sub-modules before
   their parent (the order in which an eager build draws);
4. the structured layers that step 3 did not reach (the swapped ones, and every one under
   ``init_weights``) are put back and re-initialised in model order, each layer's parts before
   the layer; the swapped ones then ``match_layer_`` their dense stand-in (its std, its bias),
   exactly what ``sparsify`` does eagerly.

Every parameter is drawn exactly once, so the draws of the global RNG are those of the eager
build: a model built on meta (and sparsified there with ``init='match'``, as ``build_model``
does) and materialised with the same seed equals the CPU build exactly when its modules
construct in registration order and each parent draws nothing of its own before its
sub-modules (``tests/test_meta.py``: every layer, the MLP and the Mixer). Otherwise (a
Transformer whose position embedding is drawn before its blocks; Hugging Face models, whose
constructors draw and whose ``init_weights`` then draws again) the statistics are the same,
the draws are not.

Paper: the Pixelfly workflow on a whole model (Dao, Chen et al., ICLR 2022, arXiv 2112.00029).

Example:
    >>> with torch.device("meta"):
    ...     model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    >>> report = sparsify(model, budget=0.25)                                  # doctest: +SKIP
    >>> materialize(model, "cpu")[0].sparse.values.device                       # doctest: +SKIP
    device(type='cpu')
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from pixelfly_lab.nn.base import StructuredLinear

__all__ = ["materialize"]


def _swap(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered (under every name)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


def _shared_slots(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """For each parameter registered in more than one place: every (module, attribute name)."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            slots.setdefault(id(param), []).append((module, name))
    return [s for s in slots.values() if len(s) > 1]


def _reset_of(module: nn.Module):
    """The module's own re-initialisation (nn.MultiheadAttention spells it ``_reset_parameters``), or None."""
    reset = getattr(module, "reset_parameters", None)
    if reset is None and isinstance(module, nn.MultiheadAttention):
        reset = module._reset_parameters
    return reset if callable(reset) else None


def _post_order(module: nn.Module, seen: set[int]):
    """Sub-modules before their parent, in registration order: the order an eager build draws in
    (a layer's parts are built, and draw, before its own bias), each module once."""
    for child in module.children():
        yield from _post_order(child, seen)
    if id(module) not in seen:
        seen.add(id(module))
        yield module


def _reset_all(module: nn.Module, seen: set[int]) -> None:
    """``reset_parameters`` of ``module`` and every sub-module not in ``seen`` (which it extends), in
    the order an eager build draws."""
    for m in _post_order(module, seen):
        reset = _reset_of(m)
        if reset is not None:
            reset()


def materialize(model: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """Allocate ``model`` on ``device`` and initialise it as building it there would have.

    Args:
        model: an nn.Module, typically built (and sparsified) under ``with torch.device("meta")``.
        device: where the parameters and buffers go.

    Returns:
        ``model`` (changed in place). Warns when a module holds parameters that no init reaches
        (no ``reset_parameters``, no ``init_weights``): their values are undefined.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    device = torch.device(device)
    waiting = [m for m in model.modules() if isinstance(m, StructuredLinear) and m.deferred_match is not None]
    for layer in waiting:
        _swap(model, layer, layer.deferred_match)
    shared = _shared_slots(model)          # to_empty gives each registration its own tensor
    model.to_empty(device=device)
    for layer in waiting:
        layer.to_empty(device=device)

    def retie():
        for slots in shared:
            module0, name0 = slots[0]
            for module, param_name in slots[1:]:
                setattr(module, param_name, getattr(module0, name0))

    retie()
    init_weights = getattr(model, "init_weights", None)
    if callable(init_weights):
        for module in model.modules():     # init_weights may read a structured layer's .weight (GPT-2's
            if isinstance(module, StructuredLinear):   # c_proj): give it valid layouts; it writes a copy
                module.restore_structure_()
        init_weights()                     # reaches no structured layer: each resets itself below
        pending = {id(m) for m in model.modules() if isinstance(m, StructuredLinear)}
    else:
        uninitialised = [name for name, m in model.named_modules()
                         if any(True for _ in m.parameters(recurse=False)) and _reset_of(m) is None]
        _reset_all(model, set())           # structured layers in place included, each once
        pending = set()
        if uninitialised:
            warnings.warn(f"materialize: {len(uninitialised)} module(s) hold parameters but have no "
                          f"reset_parameters (their values are undefined): {uninitialised[:5]}", stacklevel=2)
    for layer in waiting:
        _swap(model, layer.deferred_match, layer)
    pending |= {id(layer) for layer in waiting}
    seen: set[int] = set()                 # shared: a structured layer's parts reset with it, once
    for module in model.modules():         # model order
        if id(module) in pending:
            _reset_all(module, seen)
            if module.deferred_match is not None:
                module.match_layer_(module.deferred_match)
                module.defer_match(None)
    retie()
    return model
