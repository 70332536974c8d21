"""Which modules of a model are linear layers, who shares their weights, and the fused paths that read them.

What counts as a linear layer (:func:`linear_layers`): ``nn.Linear``; Hugging Face's ``Conv1D``
(GPT-2 and kin: y = x W + b with W stored (in, out) and ``nf`` = out), recognised by its shape
and attribute, so ``transformers`` is never imported; subclasses of nn.Linear (listed, not
replaced by :func:`pixelfly_lab.nn.sparsification.sparsify`: ``nn.MultiheadAttention`` hands
``out_proj.weight`` straight to its kernel); and layers that are already structured.

Example:
    >>> [name for name, _ in linear_layers(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))]
    ['0', '2']
"""

from __future__ import annotations

import torch
from torch import nn

from pixelfly_lab.nn.base import StructuredLinear

__all__ = ["linear_layers", "linear_kind", "linear_features", "linear_weight", "parameter_owners",
           "turn_off_fast_path"]


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face ``Conv1D`` by duck typing: y = x W + b, W (in, out), ``nf`` = out, no nn.Linear."""
    weight, nf = getattr(module, "weight", None), getattr(module, "nf", None)
    return (not isinstance(module, nn.Linear) and isinstance(nf, int) and isinstance(weight, torch.Tensor)
            and weight.dim() == 2 and weight.shape[1] == nf)


def linear_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', 'subclass' (of nn.Linear), 'structured' or None (not linear-like)."""
    if type(module) is nn.Linear:
        return "linear"
    if isinstance(module, StructuredLinear):
        return "structured"
    if isinstance(module, nn.Linear):
        return "subclass"
    return "conv1d" if is_conv1d(module) else None


def linear_features(module: nn.Module, kind: str) -> tuple[int, int]:
    """(out_features, in_features) of a linear-like module."""
    if kind == "conv1d":
        return module.nf, module.weight.shape[0]
    return module.out_features, module.in_features


def linear_weight(module: nn.Module, kind: str) -> torch.Tensor:
    """W (out, in) with y = x W^T + b."""
    return module.weight.t() if kind == "conv1d" else module.weight


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every linear-like module of ``model`` by qualified name, in model order, each module once.

    Linear-like: nn.Linear and its subclasses, Hugging Face ``Conv1D`` (weight (in, out),
    attribute ``nf``) and structured layers (:class:`pixelfly_lab.nn.base.StructuredLinear`);
    the modules inside a structured layer (a gate) are its own business and are not listed.
    """
    found, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        kind = linear_kind(module)
        if kind is not None and module is not model:
            found.append((name, module))
        if kind == "structured":
            inside.append(name + ".")
    return found


def parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> every (module name, module) that registers it (repeats included)."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), []).append((name, module))
    return owners


def turn_off_fast_path(model: nn.Module, replaced: set[int]) -> dict[int, str]:
    """Turn off PyTorch's fused Transformer fast path where a replaced layer would be read by it.

    ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder`` on its first layer) hand
    ``linear1.weight`` / ``linear2.weight`` to one fused kernel in eval mode under no_grad; a
    structured layer's ``.weight`` is only a copy of its dense equivalent (the kernel would run
    dense, without gradients to the layer's parameters). Setting ``activation_relu_or_gelu = 0``
    (read only by the fast-path check; the slow path calls ``self.activation``) and
    ``use_nested_tensor = False`` sends those modules down the ordinary path, which calls the
    layers. Returns {id(replaced layer): note}.
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
