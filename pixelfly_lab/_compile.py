"""One hint for torch.compile that must not import torch._dynamo at package import."""

from __future__ import annotations

__all__ = ["assume_constant"]


def assume_constant(fn):
    """torch.compile evaluates ``fn`` once while tracing and keeps the result (no graph break).

    What ``torch.compiler.assume_constant_result`` does (the same attribute, read by dynamo since
    torch 2.0), without its import: that would import torch._dynamo, which imports triton, at
    package import.
    """
    fn._dynamo_marked_constant = True
    return fn
