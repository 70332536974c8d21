"""Whether float32 matmuls may use TF32: one reading of torch's two APIs, for the dispatcher
(:mod:`pixelfly_lab.ops.matmul`) and the Triton kernels (:mod:`pixelfly_lab.ops.triton_kernels`), which
must not import each other both ways."""

import torch

__all__ = ["tf32_allowed", "dot_precision"]


def tf32_allowed() -> bool:
    """Whether float32 matmuls may use TF32, read from whichever of torch's two APIs is in use.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ('tf32', 'ieee', or 'none' =
    inherit, which it reports resolved); older torch only ``allow_tf32``, which newer torch refuses
    to read once TF32 was set through the new API (a RuntimeError), so each read is guarded.
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = getattr(matmul, "fp32_precision", None)
    except RuntimeError:
        precision = None
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return False


def dot_precision(dtype: torch.dtype, precision: str | None = None) -> tuple[str, str]:
    """(tl.dot input precision, accumulator dtype name) of the Triton kernels for inputs of ``dtype``.

    float64: ('ieee', 'float64'); float32: 'tf32' where torch allows it for matmuls
    (:func:`tf32_allowed`) or ``precision`` says so, 'ieee' (FMA dots) otherwise; 16-bit inputs:
    float32 accumulation ('tf32' is ignored by tl.dot for them). The name is a ``triton.language``
    attribute (``getattr(tl, name)``): this module does not import triton.

    Args:
        dtype: the inputs' dtype.
        precision: None (as torch allows), 'tf32' or 'ieee'.

    Returns:
        (precision, accumulator dtype name).
    """
    if dtype == torch.float64:
        return "ieee", "float64"
    if precision not in (None, "tf32", "ieee"):
        raise ValueError(f"precision must be None, 'tf32' or 'ieee', got {precision!r}")
    if dtype == torch.float32 and (precision == "ieee" or precision is None and not tf32_allowed()):
        return "ieee", "float32"
    return "tf32", "float32"
