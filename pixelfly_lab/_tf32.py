"""Whether float32 matmuls may use TF32: one reading of torch's two APIs, for the dispatcher
(:mod:`pixelfly_lab.ops.matmul`) and the Triton kernels (:mod:`pixelfly_lab.ops.triton_kernels`), which
must not import each other both ways."""

import torch

__all__ = ["tf32_allowed"]


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
