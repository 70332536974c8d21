"""Argument checks shared across the package: bad input gets a ValueError or TypeError naming it.

One place for the checks that many modules need (an int, a power of two, a budget, a finite
number in a range, an input's width), so that every module words the same mistake the same way.
Checks that only one module needs stay in that module.

Example:
    >>> check_power_of_two("butterfly_size", 16)
    16
    >>> check_budget(0.25)
    0.25
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["is_power_of_two", "check_int", "check_power_of_two", "check_budget", "check_number",
           "check_input_width", "check_divides", "check_bool", "check_choice", "check_lowrank_init",
           "check_finite", "LOWRANK_INITS"]

# The initialisations of a low-rank factor pair U V^T (see pixelfly_lab.nn.layers.LowRankLinear).
LOWRANK_INITS = ("svd", "kaiming")


def is_power_of_two(n) -> bool:
    """True for the ints 1, 2, 4, 8, ... (bools are not ints here)."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an int >= ``minimum``; TypeError for a non-int (bool included), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_power_of_two(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an int >= ``minimum`` and a power of two."""
    check_int(name, value, minimum)
    if not is_power_of_two(value):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


def check_budget(budget) -> float:
    """A budget (fraction of a dense layer's parameters): a real number in (0, 1], as a float.

    Any real number type counts (numpy scalars, Fraction); bools do not. 1 is a dense layer.
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be a real number in (0, 1], got {type(budget).__name__}")
    value = float(budget)
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"budget must be in (0, 1] (a fraction of the dense parameters), got {budget}")
    return value


def check_number(name: str, value, low: float = 0.0, high: float = math.inf, include_low: bool = False) -> float:
    """A real number in (low, high] (or [low, high] with ``include_low``), else a ValueError naming it."""
    inside = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and (low <= value if include_low else low < value) and value <= high)
    if not inside:
        raise ValueError(f"{name} must be a number in {'[' if include_low else '('}{low}, {high}], got {value!r}")
    return float(value)


def check_input_width(x: torch.Tensor, expected: int, owner: str = "layer") -> None:
    """Raise a ValueError naming ``expected`` when x's last dimension differs from it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: input x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != expected:
        raise ValueError(f"{owner}: expected input x with last dimension in_features={expected}, "
                         f"got shape {tuple(x.shape)}")


def check_divides(name: str, value: int, in_features: int, out_features: int) -> int:
    """``value`` if it is an int >= 1 dividing both sizes, else a ValueError naming it."""
    check_int(name, value)
    if in_features % value or out_features % value:
        raise ValueError(f"{name}={value} must divide in_features={in_features} and out_features={out_features}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool, else a TypeError naming it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(name: str, value, choices: tuple) -> object:
    """``value`` if it is one of ``choices``, else a ValueError naming it and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_lowrank_init(value, name: str = "lowrank_init") -> str:
    """One of :data:`LOWRANK_INITS` ('svd', 'kaiming')."""
    return check_choice(name, value, LOWRANK_INITS)


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` if every entry is finite, else a ValueError naming it and the count.

    One sum and one host read when all is well (a NaN or inf anywhere makes the sum non-finite; a
    finite sum that overflows is counted exactly and passes).
    """
    data = tensor.detach()
    if data.numel() == 0 or bool(torch.isfinite(data.sum())):
        return tensor
    bad = int((~torch.isfinite(data)).sum())
    if bad:
        raise ValueError(f"{name} has {bad} non-finite entr{'y' if bad == 1 else 'ies'} (NaN or inf) of "
                         f"{tensor.numel()}")
    return tensor
