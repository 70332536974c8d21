"""Block-sparse matmul with autograd: a slow reference and a fast plain-PyTorch CPU path.

Storage convention (shared with the layers and the Triton kernels): a weight W of shape
(out_features, in_features) supported on a bool block ``layout`` of shape (R, C) =
(out_features / b, in_features / b) is stored as ``values`` of shape (nnz, b, b), where block k
is the k-th True entry of ``layout`` in row-major order (the order of ``layout.nonzero()``):

    values[k] = W[i*b:(i+1)*b, j*b:(j+1)*b]  for (i, j) = layout.nonzero()[k]

The products computed here are nn.Linear's, y = x W^T + bias, and with a low-rank term
(Pixelfly, Dao, Chen et al. 2022, arXiv 2112.00029):

    y = x (S + U V^T)^T + bias = x S^T + (x V) U^T + bias,    U (out, r), V (in, r).

Backends (``backend=``):

* ``'reference'``: ``F.linear(x, blocks_to_dense(values, layout) + U V^T, bias)``; obviously
  correct, made of differentiable, vmappable torch ops (torch.func works through it).
* ``'torch'``: the fast CPU path (:mod:`pixelfly_lab.torch_kernels`). Block rows that read the
  same block columns form one dense GEMM over their gathered inputs (a flat block butterfly has
  butterfly_size such groups; block-diagonal layouts need no gather at all), the low-rank term
  rides in the same GEMMs as extra columns, and rows are swept in cache-sized chunks.
  Measured on a 2-core AMD EPYC with MKL, one thread, float32, x (4096, 1024) -> 4096, the
  released Pixelfly configuration (16, 2, rank 32, block 32, budget 0.227): forward ~3.5x and
  forward+backward ~3x faster than nn.Linear (FLOP limit 4.4x; the group GEMMs, 256 output
  columns wide, run at ~85% of a large dense GEMM's rate). ``python -m pixelfly_lab bench``.
* ``'triton'``: ``pixelfly_lab.triton_kernels`` (``block_sparse_matmul_triton``, and
  ``pixelfly_matmul_triton`` with the low-rank term fused) for CUDA tensors, or on the CPU under
  ``TRITON_INTERPRET=1``; imported lazily, only when used.
* ``'auto'`` (default): 'triton' for CUDA inputs when triton imports and supports the block size
  and dtype, else 'torch'; but 'reference' for small products (below :data:`AUTO_MIN_MACS`
  multiply-adds, where per-call overhead dominates) and inside torch.func transforms
  (vmap/grad/jacrev), which the custom autograd Function of the 'torch' path does not support.

Under ``torch.autocast`` the 'torch' and 'reference' paths compute in the autocast dtype.

Example:
    >>> layout = torch.tensor([[True, False], [True, True]])
    >>> values = torch.randn(3, 4, 4)
    >>> x = torch.randn(5, 8)
    >>> y = block_sparse_matmul(x, values, layout)
    >>> torch.allclose(y, x @ blocks_to_dense(values, layout).T, atol=1e-5)
    True
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._checks import check_input_width
from .torch_kernels import BlockSparseLowRankFunction, plan_for

__all__ = ["BACKENDS", "AUTO_MIN_MACS", "block_sparse_matmul", "sparse_lowrank_matmul", "blocks_to_dense",
           "dense_to_blocks", "check_input_width", "resolve_backend", "plan_for"]

BACKENDS = ("auto", "torch", "reference", "triton")


# ----------------------------------------------------------------------------- validation

def _check_operands(x, values, layout, bias, u=None, v=None) -> int:
    """Validate shapes; return the block size."""
    if not isinstance(layout, torch.Tensor) or layout.dim() != 2 or layout.dtype != torch.bool:
        raise ValueError("layout must be a 2-D bool tensor (out_features/b, in_features/b)")
    if not isinstance(values, torch.Tensor) or values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"values must have shape (nnz_blocks, b, b), got "
                         f"{tuple(getattr(values, 'shape', ()))}")
    if (isinstance(x, torch.Tensor) and x.dtype != values.dtype
            and not torch.is_autocast_enabled(x.device.type)):
        raise TypeError(f"x has dtype {x.dtype} but values has dtype {values.dtype}")
    nnz, b = values.shape[0], values.shape[1]
    if nnz != int(layout.sum()):
        raise ValueError(f"values holds {nnz} blocks but layout has {int(layout.sum())} nonzero blocks")
    rows, cols = layout.shape[0] * b, layout.shape[1] * b
    check_input_width(x, cols, "block_sparse_matmul")
    if bias is not None and tuple(bias.shape) != (rows,):
        raise ValueError(f"bias must have shape ({rows},), got {tuple(bias.shape)}")
    if (u is None) != (v is None):
        raise ValueError("give both u and v for the low-rank term, or neither")
    if u is not None:
        if u.dim() != 2 or v.dim() != 2 or u.shape[0] != rows or v.shape[0] != cols or u.shape[1] != v.shape[1]:
            raise ValueError(f"u must be ({rows}, r) and v ({cols}, r), got {tuple(u.shape)} and {tuple(v.shape)}")
    return b


# ----------------------------------------------------------------------------- reference

def _block_index_map(layout: torch.Tensor) -> torch.Tensor:
    """Long (R*C,): 1 + the storage index of each block, 0 where the layout is False."""
    flat = layout.flatten().long()
    return torch.cumsum(flat, 0) * flat


def blocks_to_dense(values: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """The dense (R*b, C*b) weight that ``values`` stores on ``layout``; zero off the layout.

    Differentiable in ``values`` and made of gathers only, so it also works under torch.func.

    Args:
        values: (nnz, b, b), blocks in row-major layout order.
        layout: bool (R, C).

    Returns:
        W (R*b, C*b) with W[i*b:(i+1)*b, j*b:(j+1)*b] = values[k] for the k-th nonzero (i, j).
    """
    (R, C), b = layout.shape, values.shape[-1]
    padded = torch.cat([values.new_zeros(1, b, b), values])          # index 0 = the zero block
    blocks = padded.index_select(0, _block_index_map(layout).to(values.device))
    return blocks.reshape(R, C, b, b).permute(0, 2, 1, 3).reshape(R * b, C * b)


def dense_to_blocks(weight: torch.Tensor, layout: torch.Tensor, block_size: int) -> torch.Tensor:
    """The blocks of ``weight`` (out, in) on ``layout``, as (nnz, b, b) in row-major layout order."""
    R, C = layout.shape
    if tuple(weight.shape) != (R * block_size, C * block_size):
        raise ValueError(f"weight must have shape {(R * block_size, C * block_size)} for this layout "
                         f"and block_size={block_size}, got {tuple(weight.shape)}")
    blocks = weight.reshape(R, block_size, C, block_size).permute(0, 2, 1, 3)
    return blocks[layout.to(weight.device)].contiguous()


def _reference(x, values, layout, bias, u, v):
    weight = blocks_to_dense(values, layout)
    if u is not None:
        weight = weight + u @ v.T
    return F.linear(x, weight, bias)


# ----------------------------------------------------------------------------- dispatch

def _in_functorch_transform() -> bool:
    """True inside torch.func transforms (vmap, grad, jacrev, ...)."""
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # a torch without functorch internals: no transforms either
        return False


def _triton_module():
    """pixelfly_lab.triton_kernels, or None when it (or triton) cannot be imported here."""
    try:
        from . import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def _triton_runs_here(x: torch.Tensor) -> bool:
    """CUDA tensors, or any tensor when Triton's CPU interpreter is on (TRITON_INTERPRET=1)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


# Below this many multiply-adds of the dense product (rows of x * in * out) 'auto' uses the
# reference: one dense GEMM beats a dozen small ones plus their per-call overhead. Measured on a
# 2-core CPU at one thread: the grouped path wins from about 1e8 (512 x 256 -> 1024), loses at
# 3e7 (128 x 256 -> 1024), and is 4-5x slower on tiny layers (128 x 64 -> 256).
AUTO_MIN_MACS = 2 ** 26


def resolve_backend(x: torch.Tensor, backend: str = "auto", block_size: int | None = None,
                    out_features: int | None = None) -> str:
    """The backend that ``backend`` means for input ``x``: 'torch', 'reference' or 'triton'.

    'auto' picks 'reference' inside torch.func transforms; 'triton' for CUDA tensors when
    ``pixelfly_lab.triton_kernels`` imports and supports the block size and dtype; 'reference'
    when the dense product is small (x.numel() * out_features < :data:`AUTO_MIN_MACS`); else
    'torch' (which also runs on CUDA, as plain PyTorch). Asking for 'triton' where it cannot run
    raises a ValueError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if _in_functorch_transform():
            return "reference"
        if x.is_cuda and (module := _triton_module()) is not None:
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
            if (block_size is None or block_size in module.BLOCK_SIZES) and dtype in module.DTYPES:
                return "triton"
        if out_features is not None and x.numel() * out_features < AUTO_MIN_MACS:
            return "reference"
        return "torch"
    if backend == "triton":
        if not _triton_runs_here(x):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); use 'auto' or "
                             "'torch' on the CPU")
        if _triton_module() is None:
            raise ValueError("backend='triton' asked for but pixelfly_lab.triton_kernels (triton) does not import")
    return backend


def _triton(x, values, layout, bias, u, v):
    module = _triton_module()
    if u is None:
        return module.block_sparse_matmul_triton(x, values, layout, bias)
    return module.pixelfly_matmul_triton(x, values, layout, u, v, bias)


def sparse_lowrank_matmul(x: torch.Tensor, values: torch.Tensor, layout: torch.Tensor,
                          u: torch.Tensor | None, v: torch.Tensor | None,
                          bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """y = x (S + U V^T)^T + bias, S block-sparse on ``layout``: Pixelfly's product, fused.

    Args:
        x: (..., in_features).
        values: (nnz, b, b) blocks of S in row-major layout order.
        layout: bool (out_features / b, in_features / b).
        u: (out_features, r) or None; v: (in_features, r) or None (no low-rank term).
        bias: (out_features,) or None.
        backend: one of :data:`BACKENDS` (see the module docstring).

    Returns:
        y (..., out_features); gradients flow to x, values, bias, u and v.

    Example:
        >>> layout = torch.eye(2, dtype=torch.bool)
        >>> y = sparse_lowrank_matmul(torch.randn(3, 8), torch.randn(2, 4, 4), layout,
        ...                           torch.randn(8, 1), torch.randn(8, 1))
        >>> y.shape
        torch.Size([3, 8])
    """
    b = _check_operands(x, values, layout, bias, u, v)
    out_features = layout.shape[0] * b
    chosen = resolve_backend(x, backend, b, out_features)
    if chosen == "triton":  # the Triton kernels handle autocast themselves
        return _triton(x, values, layout, bias, u, v)
    if torch.is_autocast_enabled(x.device.type):
        # compute in the autocast dtype, as F.linear would; the GEMMs below then see one dtype
        dtype = torch.get_autocast_dtype(x.device.type)
        x, values, bias, u, v = (t if t is None else t.to(dtype) for t in (x, values, bias, u, v))
        with torch.autocast(x.device.type, enabled=False):
            return sparse_lowrank_matmul(x, values, layout, u, v, bias, backend=chosen)
    if chosen == "reference":
        return _reference(x, values, layout, bias, u, v)
    batch = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = BlockSparseLowRankFunction.apply(x2, values, bias, u, v, plan_for(layout, b), out_features)
    return y.reshape(*batch, out_features)


def block_sparse_matmul(x: torch.Tensor, values: torch.Tensor, layout: torch.Tensor,
                        bias: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """y = x W^T + bias for W stored as its nonzero blocks on ``layout``.

    Args:
        x: (..., in_features), in_features = layout.shape[1] * b.
        values: (nnz, b, b), block k = the k-th True entry of ``layout`` in row-major order.
        layout: bool (out_features / b, in_features / b).
        bias: (out_features,) or None.
        backend: 'auto', 'torch' (fast CPU), 'reference' (F.linear on the dense weight) or 'triton'.

    Returns:
        y (..., out_features); gradients flow to x, values and bias (values' gradient is only
        ever the layout's blocks: W has no other entries).
    """
    return sparse_lowrank_matmul(x, values, layout, None, None, bias, backend=backend)
