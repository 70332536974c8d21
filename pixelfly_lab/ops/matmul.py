"""Block-sparse matmul with autograd: a slow reference, a fast plain-PyTorch CPU path, Triton on GPUs.

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
* ``'torch'``: the fast CPU path (:mod:`pixelfly_lab.ops.torch_kernels`). Block rows that read the
  same block columns form one dense matrix product (a flat block butterfly has butterfly_size
  such groups), their inputs read as views (one GEMM per column run, accumulated), the low-rank
  term and the bias one more GEMM per group, and rows are swept in cache-sized chunks; 16-bit
  inputs take padded groups (wider GEMMs over contiguous inputs). How fast it is depends on the
  machine's own GEMM rate: ``python -m pixelfly_lab bench`` prints, beside each speed-up, the
  useful rate as a fraction of nn.Linear's rate on the same machine (the README's Notes).
* ``'triton'``: :mod:`pixelfly_lab.ops.triton_kernels` (the low-rank term and the bias fused into the
  block-sparse kernels) for CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1``; imported
  lazily, only when used.
* ``'auto'`` (default): 'reference' inside torch.func transforms (vmap/grad/jacrev), which the
  custom ops (:mod:`pixelfly_lab.ops.matmul_ops`) do not support; 'triton' for CUDA inputs where
  it beats cuBLAS: bfloat16 and float16 on compute capability >= 8.0 (tensor cores), float32 only
  when TF32 is allowed
  (:func:`tf32_allowed`; without TF32, Triton's fp32 FMA path is slower than cuBLAS) and never
  float64; else 'reference' for small products of small weights (below :data:`AUTO_MIN_MACS`
  multiply-adds and :data:`AUTO_MAX_REFERENCE_WEIGHT` weight entries, where per-call set-up
  dominates) and 'torch' for the rest.

torch.compile: the 'torch' and 'triton' paths are torch custom ops (``torch.ops.pixelfly_lab.*``,
in :mod:`pixelfly_lab.ops.matmul_ops`, registered with ``torch.library.custom_op`` and their autograd formula), so
``torch.compile(model, fullgraph=True)`` traces a model through them, forward and backward,
without graph breaks. A custom op cannot take a Python object, so a layout is registered once
(:func:`register_layout`, which reads it to the host and validates it) and the ops get its int
key; layers do that at construction, so their forward and backward never read a tensor back to
the host. The plans and index tables of a key are cached per device. Eager calls of the 'torch'
path (nothing tracing, no mode active, plain tensors: :func:`~pixelfly_lab.ops.matmul_ops.eager`) run the
op's own forward and backward through a plain autograd.Function instead, without the op's dispatch
(:class:`~pixelfly_lab.ops.matmul_ops.EagerTorchProduct`: 0.15-0.3 ms less per forward+backward).
The Triton path is an opaque custom op rather than ``torch.library.triton_op``: its launchers
autotune with a config pruner and look their index tables up by key, which triton_op's tracing
(fake tensors, restricted autotuner support in torch 2.4-2.6) does not cover.

Under ``torch.autocast`` every path computes in the autocast dtype. Where the compiled bfloat16
sweep takes the product (CPU, AMX or AVX512-BF16, even block size: :func:`~pixelfly_lab.ops.native_linear.native_takes`)
float32 x and parameters go into its custom op uncast: where the sweep runs the product it rounds x
tile by tile and the parameters as it packs them, and their gradients come back unrounded (float32
sums); on the other paths (and the op's dense route), as with ``F.linear``, they are cast and their
gradients are rounded to the autocast dtype first.

Example:
    >>> layout = torch.tensor([[True, False], [True, True]])
    >>> values = torch.randn(3, 4, 4)
    >>> x = torch.randn(5, 8)
    >>> y = block_sparse_matmul(x, values, layout)
    >>> torch.allclose(y, x @ blocks_to_dense(values, layout).T, atol=1e-5)
    True
"""

import functools
import os

import torch
import torch.nn.functional as F

from pixelfly_lab._checks import check_input_width
from pixelfly_lab._compile import assume_constant
from pixelfly_lab._tf32 import tf32_allowed
from pixelfly_lab.ops.matmul_ops import EagerTorchProduct, eager, torch_forward_op, triton_forward_op
from pixelfly_lab.ops.native_linear import native_takes
from pixelfly_lab.ops.registry import BLOCK_SIZES, RegisteredLayout, register_layout, registered_layout
from pixelfly_lab.ops.torch_kernels import plan_for  # re-exported: tests and callers import it from here

__all__ = ["BACKENDS", "AUTO_MIN_MACS", "AUTO_MAX_REFERENCE_WEIGHT", "block_sparse_matmul", "sparse_lowrank_matmul",
           "blocks_to_dense", "dense_to_blocks", "check_input_width", "resolve_backend", "plan_for", "register_layout",
           "registered_layout", "RegisteredLayout", "tf32_allowed"]

BACKENDS = ("auto", "torch", "reference", "triton")


# ----------------------------------------------------------------------------- validation

def _check_operands(x, values, layout, bias, u, v, layout_key, autocast: bool) -> RegisteredLayout:
    """Validate shapes, devices and dtypes (no tensor is read; dtypes may differ under
    ``autocast``); return the layout's registry entry."""
    if not isinstance(values, torch.Tensor) or values.dim() != 3 or values.shape[1] != values.shape[2]:
        raise ValueError(f"values must have shape (nnz_blocks, b, b), got "
                         f"{tuple(getattr(values, 'shape', ()))}")
    if not isinstance(layout, torch.Tensor) or layout.dim() != 2 or layout.dtype != torch.bool:
        raise ValueError("layout must be a 2-D bool tensor (out_features/b, in_features/b)")
    b = values.shape[1]
    if layout_key is not None:
        entry = registered_layout(layout_key)
    elif _in_functorch_transform():  # tensors cannot be read to numpy here; the reference needs no key
        entry = RegisteredLayout(-1, layout, b, int(layout.sum()))
    else:
        entry = registered_layout(register_layout(layout, b))
    if entry.block_size != b or tuple(entry.layout.shape) != tuple(layout.shape):
        raise ValueError(f"layout_key {entry.key} is a {tuple(entry.layout.shape)} layout of blocks of "
                         f"{entry.block_size}, but layout has shape {tuple(layout.shape)} and values blocks of {b}")
    if values.shape[0] != entry.nnz:
        raise ValueError(f"values holds {values.shape[0]} blocks but layout has {entry.nnz} nonzero blocks")
    check_input_width(x, entry.in_features, "block_sparse_matmul")
    if bias is not None and tuple(bias.shape) != (entry.out_features,):
        raise ValueError(f"bias must have shape ({entry.out_features},), got {tuple(bias.shape)}")
    if (u is None) != (v is None):
        raise ValueError("give both u and v for the low-rank term, or neither")
    rows, cols = entry.out_features, entry.in_features
    if u is not None:
        if u.dim() != 2 or v.dim() != 2 or u.shape[0] != rows or v.shape[0] != cols or u.shape[1] != v.shape[1]:
            raise ValueError(f"u must be ({rows}, r) and v ({cols}, r), got {tuple(u.shape)} and {tuple(v.shape)}")
    for name, t in (("values", values), ("bias", bias), ("u", u), ("v", v)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype and not autocast:
            raise TypeError(f"x has dtype {x.dtype} but {name} has dtype {t.dtype}")
    return entry


def _autocast_enabled(device_type: str) -> bool:
    return device_type != "meta" and torch.is_autocast_enabled(device_type)  # meta has no autocast


@assume_constant
def _sweep_rounds_x(device_type: str, block_size: int) -> bool:
    """Whether the compiled bfloat16 sweep runs on this device at this block size (it then takes a
    float32 x under autocast and rounds it itself); a constant to torch.compile."""
    return native_takes(torch.bfloat16, device_type, block_size)


# ----------------------------------------------------------------------------- reference

def _block_index_map(layout: torch.Tensor) -> torch.Tensor:
    """Long (R*C,): 1 + the storage index of each block, 0 where the layout is False."""
    flat = layout.flatten().long()
    return torch.cumsum(flat, 0) * flat


def blocks_to_dense(values: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """The dense (R*b, C*b) weight that ``values`` stores on ``layout``; zero off the layout.

    Differentiable in ``values`` and made of gathers only, so it also works under torch.func
    and torch.compile (no value of ``layout`` is read on the host).

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


@functools.cache  # Python does not remember a failed import: without triton, each call would retry it
def _triton_module():
    """pixelfly_lab.ops.triton_kernels, or None when it (or triton) cannot be imported here."""
    try:
        from pixelfly_lab.ops import triton_kernels
    except ImportError:
        return None
    return triton_kernels


def _triton_runs_here(x: torch.Tensor) -> bool:
    """CUDA tensors, or any tensor when Triton's CPU interpreter is on (TRITON_INTERPRET=1)."""
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


@assume_constant
def _triton_wins(device_index: int, dtype: torch.dtype, block_size: int | None) -> bool:
    """Whether 'auto' sends a CUDA product on this device, dtype and block size to Triton.

    Under torch.compile this is decided once, when tracing: change TF32 settings before compiling.
    """
    if block_size is not None and block_size not in BLOCK_SIZES:
        return False
    if dtype not in (torch.bfloat16, torch.float16) and not (dtype == torch.float32 and tf32_allowed()):
        return False  # float64, or float32 without TF32: cuBLAS (through the 'torch' path) is faster
    if torch.cuda.get_device_capability(device_index) < (8, 0):
        return False  # bfloat16 (and TF32) tensor-core dots need sm_80+
    return _triton_module() is not None


# Below this many multiply-adds of the dense product (rows of x * in * out), of a weight below
# AUTO_MAX_REFERENCE_WEIGHT entries, 'auto' uses the reference: one dense GEMM beats the grouped
# path's per-call set-up there. The reference materialises the dense weight on every call, so a
# large layer at a few rows takes the grouped path whatever the product's size. Measured (Xeon with
# AMX, one thread, Pixelfly layers with blocks of 32 and rank 8, fwd+bwd, medians of 15; reference /
# 'torch' with the compiled sweep): 1024 -> 4096 at 1 row 26.1 / 3.8 ms, at 64 rows 43.7 / 5.0;
# 512 -> 2048 at 1 row 4.0 / 1.3; 256 -> 1024 at 1 row 1.10 / 0.81, at 64 rows 1.74 / 1.22;
# 128 -> 512 at 1 row 0.42 / 0.56, at 64 rows 0.60 / 0.70.
AUTO_MIN_MACS = 2 ** 26
AUTO_MAX_REFERENCE_WEIGHT = 2 ** 17


def resolve_backend(x: torch.Tensor, backend: str = "auto", block_size: int | None = None,
                    out_features: int | None = None) -> str:
    """The backend that ``backend`` means for input ``x``: 'torch', 'reference' or 'triton'.

    'auto' picks 'reference' inside torch.func transforms; 'triton' for CUDA tensors where it
    beats cuBLAS (bfloat16/float16 on sm_80+, float32 only with TF32 allowed; block size in
    16..128; see the module docstring); 'reference' when the dense product and the weight are small
    (x.numel() * out_features < :data:`AUTO_MIN_MACS`, in * out < :data:`AUTO_MAX_REFERENCE_WEIGHT`);
    else 'torch' (which also runs on CUDA, as plain PyTorch). Asking for 'triton' where it cannot run
    raises a ValueError.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if _in_functorch_transform():
            return "reference"
        if x.is_cuda:
            dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
            index = x.device.index if x.device.index is not None else torch.cuda.current_device()
            if _triton_wins(index, dtype, block_size):
                return "triton"
        if (out_features is not None and x.numel() * out_features < AUTO_MIN_MACS
                and x.shape[-1] * out_features < AUTO_MAX_REFERENCE_WEIGHT):
            return "reference"
        return "torch"
    if backend == "triton":
        if not _triton_runs_here(x):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1); use 'auto' or "
                             "'torch' on the CPU")
        if _triton_module() is None:
            raise ValueError("backend='triton' asked for but pixelfly_lab.ops.triton_kernels (triton) does not import")
        if block_size is not None and block_size not in BLOCK_SIZES:
            raise ValueError(f"backend='triton' supports block sizes {BLOCK_SIZES}, got {block_size}")
    return backend


def sparse_lowrank_matmul(x: torch.Tensor, values: torch.Tensor, layout: torch.Tensor,
                          u: torch.Tensor | None, v: torch.Tensor | None,
                          bias: torch.Tensor | None = None, *, backend: str = "auto",
                          layout_key: int | None = None) -> torch.Tensor:
    """y = x (S + U V^T)^T + bias, S block-sparse on ``layout``: Pixelfly's product, fused.

    Args:
        x: (..., in_features).
        values: (nnz, b, b) blocks of S in row-major layout order.
        layout: bool (out_features / b, in_features / b).
        u: (out_features, r) or None; v: (in_features, r) or None (no low-rank term).
        bias: (out_features,) or None.
        backend: one of :data:`BACKENDS` (see the module docstring).
        layout_key: :func:`register_layout` (layout, b), if known: then nothing is read from
            ``layout`` on the host (no device sync; what torch.compile needs). Without it the
            layout is read and registered on every call.

    Returns:
        y (..., out_features); gradients flow to x, values, bias, u and v.

    Example:
        >>> layout = torch.eye(2, dtype=torch.bool)
        >>> y = sparse_lowrank_matmul(torch.randn(3, 8), torch.randn(2, 4, 4), layout,
        ...                           torch.randn(8, 1), torch.randn(8, 1))
        >>> y.shape
        torch.Size([3, 8])
    """
    autocast = _autocast_enabled(x.device.type)   # queried once per call
    entry = _check_operands(x, values, layout, bias, u, v, layout_key, autocast)
    chosen = resolve_backend(x, backend, entry.block_size, entry.out_features)
    if not autocast:
        return _dispatch(chosen, backend, entry, x, values, layout, bias, u, v)
    # compute in the autocast dtype, as F.linear would: cast once, dispatch once (the casts are
    # differentiable, so gradients come back in the parameters' dtypes), and autocast is off inside
    # the kernels so that nothing is cast again. Float32 operands stay uncast where the compiled
    # bfloat16 sweep runs the 'torch' op: it rounds x tile by tile and the parameters as it packs
    # them, and returns their gradients in float32 (see pixelfly_lab.ops.native_linear)
    dtype = torch.get_autocast_dtype(x.device.type)
    uncast = (chosen == "torch" and dtype == torch.bfloat16 and _sweep_rounds_x(x.device.type, entry.block_size))
    x, values, bias, u, v = (t if t is None or (uncast and t.dtype == torch.float32) else t.to(dtype)
                             for t in (x, values, bias, u, v))
    with torch.autocast(x.device.type, enabled=False):
        return _dispatch(chosen, backend, entry, x, values, layout, bias, u, v, dtype)


def _dispatch(chosen: str, backend: str, entry: RegisteredLayout, x, values, layout, bias, u, v,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run the chosen backend on checked operands of one dtype (the 'torch' op computes in ``dtype``
    from float32 operands too: see :func:`sparse_lowrank_matmul`)."""
    if chosen == "reference":
        return _reference(x, values, layout, bias, u, v)
    if entry.key < 0:
        raise ValueError(f"backend={backend!r} does not run inside torch.func transforms; use 'auto' or 'reference'")
    op = triton_forward_op if chosen == "triton" else torch_forward_op
    if chosen == "triton":
        from pixelfly_lab.ops.triton_kernels import DTYPES
        if x.dtype not in DTYPES:
            raise TypeError(f"backend='triton' supports dtypes {DTYPES}, got {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    if chosen == "torch" and eager(x2, values, bias, u, v):   # the op's functions without its dispatch
        y, _ = EagerTorchProduct.apply(x2, values, bias, u, v, entry.key, dtype)
    else:
        extra = (dtype,) if chosen == "torch" and dtype is not None else ()
        y, _ = op(x2, values, bias, u, v, entry.key, *extra)
    return y.reshape(*x.shape[:-1], entry.out_features)


def block_sparse_matmul(x: torch.Tensor, values: torch.Tensor, layout: torch.Tensor,
                        bias: torch.Tensor | None = None, *, backend: str = "auto",
                        layout_key: int | None = None) -> torch.Tensor:
    """y = x W^T + bias for W stored as its nonzero blocks on ``layout``.

    Args:
        x: (..., in_features), in_features = layout.shape[1] * b.
        values: (nnz, b, b), block k = the k-th True entry of ``layout`` in row-major order.
        layout: bool (out_features / b, in_features / b).
        bias: (out_features,) or None.
        backend: 'auto', 'torch' (fast CPU), 'reference' (F.linear on the dense weight) or 'triton'.
        layout_key: as in :func:`sparse_lowrank_matmul`.

    Returns:
        y (..., out_features); gradients flow to x, values and bias (values' gradient is only
        ever the layout's blocks: W has no other entries).
    """
    return sparse_lowrank_matmul(x, values, layout, None, None, bias, backend=backend, layout_key=layout_key)
