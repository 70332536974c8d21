"""The tensor a model's forward returned, whatever it is wrapped in.

Models people have return a tensor (``nn.Sequential``), a mapping (``{'logits': ...}``) or a
dataclass (Hugging Face's ``CausalLMOutput``, which is both). Every helper that calls a user's
model (the step timer, the empirical NTK, the training loop) reads its output through
:func:`model_output`, so each accepts the same models the same way: the tensor itself,
``output_fn(output)`` when the user passes one, else ``output['logits']`` or ``output.logits``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["check_output_fn", "model_output"]


def check_output_fn(output_fn) -> None:
    """Raise TypeError unless ``output_fn`` is None or a callable."""
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be a callable output -> tensor or None, got {type(output_fn).__name__}")


def model_output(output, output_fn=None) -> torch.Tensor:
    """The tensor in a forward's ``output``.

    Args:
        output: what ``model(x)`` returned: a tensor, a mapping with a 'logits' entry, or an
            object with a ``.logits`` attribute (a dataclass, a Hugging Face ``ModelOutput``).
        output_fn: optional callable output -> tensor; when given it alone decides.

    Returns:
        The tensor, e.g. (B, C) class scores or (B, T, V) language-model logits.

    Example:
        >>> model_output({"logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
    """
    if output_fn is not None:
        output = output_fn(output)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"output_fn must return a tensor, got {type(output).__name__}")
        return output
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(f"the model returned {type(output).__name__}, which is neither a tensor nor has 'logits'; "
                    f"pass output_fn=lambda output: <the tensor to use>")
