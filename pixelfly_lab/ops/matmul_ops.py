"""The torch custom ops of :mod:`pixelfly_lab.ops.matmul`'s 'torch' and 'triton' paths, with autograd.

``torch.ops.pixelfly_lab.sparse_lowrank_torch`` and ``sparse_lowrank_triton`` (and their backward
ops) compute (y, z = x2 V) of y = x2 (S + U V^T)^T + bias for a layout registered in
:mod:`pixelfly_lab.ops.registry`; they take the layout's int key (a custom op cannot take a Python
object), so torch.compile traces through them without graph breaks and nothing is read back to
the host. The plans (:mod:`pixelfly_lab.ops.torch_plan`) and Triton index tables
(:mod:`pixelfly_lab.ops.triton_tables`) of a key are cached per device by the registry; the
Triton kernels are imported on first use only. Tested through
:func:`pixelfly_lab.ops.matmul.sparse_lowrank_matmul` (tests/test_kernels.py, tests/test_compile.py,
tests/test_triton.py).
"""

from typing import List, Optional, Sequence, Tuple

import torch

from pixelfly_lab.ops import torch_kernels
from pixelfly_lab.ops.native_linear import native_takes
from pixelfly_lab.ops.registry import RegisteredLayout, derived, registered_layout
from pixelfly_lab.ops.torch_kernels import plan_for
from pixelfly_lab.ops.triton_tables import tables_for   # cached by the registry per key and device

__all__ = ["torch_forward_op", "triton_forward_op", "EagerTorchProduct", "eager"]


# ----------------------------------------------------------------------------- plans

def _plan(key: int, device: torch.device, dtype: torch.dtype) -> torch_kernels.Plan:
    """The 'torch' path's plan of a registered layout for ``dtype``, its indices on ``device``
    (built once per layout and device): padded groups for 16-bit dtypes that the PyTorch grouped
    GEMMs run (see :func:`pixelfly_lab.ops.torch_kernels.plan_for`)."""
    # the compiled sweep (bfloat16 with AMX or AVX512-BF16, even blocks) reads views in place: no padding
    if dtype in (torch.bfloat16, torch.float16) and not native_takes(dtype, device, registered_layout(key).block_size):
        return derived(key, "torch_plan_padded", lambda entry, dev: plan_for(
            entry.layout, entry.block_size, dev, fill=torch_kernels.PAD_FILL), device)
    return derived(key, "torch_plan", lambda entry, dev: plan_for(entry.layout, entry.block_size, dev), device)

# ----------------------------------------------------------------------------- custom ops

def _empty(like: torch.Tensor) -> torch.Tensor:
    """The stand-in for an absent gradient (a custom op returns tensors, never None)."""
    return like.new_empty(0)


def _own(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """t as an op output: never a view (outputs may not alias each other), an empty tensor for None."""
    if t is None:
        return _empty(like)
    return t.clone() if t._is_view() else t


def _needed(needs, has_bias: bool) -> list[bool]:
    return [bool(needs[0]), bool(needs[1]), bool(needs[2]) and has_bias, bool(needs[3]), bool(needs[4])]


def _grad_shapes(gy, x2, values, u, v, entry: RegisteredLayout, needed) -> list:
    """Empty gradients of the backward's shapes and dtypes: x2's, values', the bias's in values',
    u's and v's own; an empty tensor like gy's where not needed (as the op)."""
    likes = [(x2, x2.shape), (values, values.shape), (values, (entry.out_features,)),
             (u, None if u is None else u.shape), (v, None if v is None else v.shape)]
    return [like.new_empty(shape) if need and shape is not None else _empty(gy)
            for (like, shape), need in zip(likes, needed)]


def _torch_forward(x2, values, bias, u, v, layout_key: int, dtype=None):
    """(y, z = x2 V or (N, 0)) of the 'torch' path (:func:`torch_kernels.sparse_lowrank_forward`),
    computed in ``dtype`` (default: values'): what the op and :class:`EagerTorchProduct` run."""
    entry = registered_layout(layout_key)
    dtype = dtype or values.dtype
    y, z = torch_kernels.sparse_lowrank_forward(x2.contiguous(), values.contiguous(), bias, u, v,
                                                _plan(layout_key, x2.device, dtype), entry.out_features, dtype)
    return y, y.new_empty(x2.shape[0], 0) if z is None else z


def _torch_backward(gy, x2, values, u, v, z, layout_key: int, needed, dtype=None) -> list:
    """(dx2, dvalues, dbias, du, dv) of the 'torch' path; an empty tensor where not ``needed``."""
    dtype = dtype or values.dtype
    grads = torch_kernels.sparse_lowrank_backward(gy, x2.contiguous(), values.contiguous(), u, v, z,
                                                  _plan(layout_key, x2.device, dtype), tuple(needed), needed[2], dtype)
    return [_own(g if need else None, gy) for g, need in zip(grads, needed)]


@torch.library.custom_op("pixelfly_lab::sparse_lowrank_torch", mutates_args=())
def torch_forward_op(x2: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor],
                      u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                      layout_key: int, dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, z = x2 V or (N, 0)) of the 'torch' path (:func:`torch_kernels.sparse_lowrank_forward`),
    computed in ``dtype`` (default: values'); x2 and the parameters may be wider (float32 under
    autocast), and their gradients come back in their dtypes."""
    return _torch_forward(x2, values, bias, u, v, layout_key, dtype)


def _forward_fake(x2, values, bias, u, v, layout_key, dtype=None):
    """Shapes of a forward op's outputs (what torch.compile and the meta device see), in the
    compute dtype (default: values')."""
    rank = 0 if u is None else u.shape[1]
    like = values.new_empty(0, dtype=dtype or values.dtype)
    return (like.new_empty(x2.shape[0], registered_layout(layout_key).out_features), like.new_empty(x2.shape[0], rank))


def _backward_fake(gy, x2, values, u, v, z, layout_key, needed, dtype=None):
    return _grad_shapes(gy, x2, values, u, v, registered_layout(layout_key), needed)


torch_forward_op.register_fake(_forward_fake)


@torch.library.custom_op("pixelfly_lab::sparse_lowrank_torch_backward", mutates_args=())
def _torch_backward_op(gy: torch.Tensor, x2: torch.Tensor, values: torch.Tensor, u: Optional[torch.Tensor],
                       v: Optional[torch.Tensor], z: Optional[torch.Tensor], layout_key: int,
                       needed: Sequence[bool], dtype: Optional[torch.dtype] = None) -> List[torch.Tensor]:
    """(dx2, dvalues, dbias, du, dv) of the 'torch' path; an empty tensor where not ``needed``."""
    return _torch_backward(gy, x2, values, u, v, z, layout_key, needed, dtype)


_torch_backward_op.register_fake(_backward_fake)


def _setup_context(ctx, inputs, output):
    x2, values, bias, u, v, layout_key, *dtype = inputs   # the 'torch' op also takes the compute dtype
    ctx.layout_key, ctx.has_bias, ctx.dtype = layout_key, bias is not None, tuple(dtype)
    ctx.save_for_backward(x2, values, u, v, output[1] if u is not None else None)


def _backward_with(op):
    def backward(ctx, gy, _grad_z):
        x2, values, u, v, z = ctx.saved_tensors
        needed = _needed(ctx.needs_input_grad, ctx.has_bias)
        grads = op(gy, x2, values, u, v, z, ctx.layout_key, needed, *ctx.dtype)
        return (*[g if need else None for g, need in zip(grads, needed)], None, *(None for _ in ctx.dtype))
    return backward


torch.library.register_autograd("pixelfly_lab::sparse_lowrank_torch", _backward_with(_torch_backward_op),
                                setup_context=_setup_context)


_eager_backward = _backward_with(_torch_backward)
_op_backward = _backward_with(_torch_backward_op)


class EagerTorchProduct(torch.autograd.Function):
    """The 'torch' op's forward and backward (the same functions) without the custom-op machinery,
    for eager calls: :func:`eager` says when. The op's dispatch through ``torch.library`` (its
    autograd wrapper, redispatch, the compile-disable wrapper, then the backward op's) cost 0.15-0.3 ms
    per forward+backward of the 1024 -> 4096 layer at budget 0.1 on two threads (an AMD EPYC, op
    against this class: 1.309 / 1.155 ms at 8 rows, medians of 400; 10.37 / 10.05 at 512 rows,
    medians of 80: 3% of that call). A backward that builds a graph (``create_graph``) runs the op's
    backward op, which refuses a second derivative as the op does. ``apply(x2, values, bias, u, v, layout_key, dtype)`` returns (y, z) as the op does;
    profilers show this class's name instead of the op's."""

    @staticmethod
    def forward(ctx, x2, values, bias, u, v, layout_key, dtype):
        y, z = _torch_forward(x2, values, bias, u, v, layout_key, dtype)
        _setup_context(ctx, (x2, values, bias, u, v, layout_key, dtype), (y, z))
        ctx.mark_non_differentiable(z)
        return y, z

    @staticmethod
    def backward(ctx, gy, grad_z):
        return (_op_backward if torch.is_grad_enabled() else _eager_backward)(ctx, gy, grad_z)


def eager(*operands) -> bool:
    """Whether a call on these operands may take :class:`EagerTorchProduct` instead of the op: plain
    tensors (no subclass, the first not on the meta device), and nothing that must see the op:
    torch.compile or torch.jit tracing, a dispatch mode (FLOP counters, fake tensors, the toolkit's
    timers), a function mode (``torch.device`` as a context, ``set_default_device``), torch.func
    transforms."""
    return (all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in operands)
            and operands[0].device.type != "meta" and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing() and torch._C._len_torch_dispatch_stack() == 0
            and torch._ops._len_torch_dispatch_stack_pre_dispatch() == 0
            and torch._C._len_torch_function_stack() == 0 and not torch._C._are_functorch_transforms_active())


@torch.library.custom_op("pixelfly_lab::sparse_lowrank_triton", mutates_args=())
def triton_forward_op(x2: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor],
                       u: Optional[torch.Tensor], v: Optional[torch.Tensor],
                       layout_key: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, t = x2 V or (N, 0)) of the 'triton' path (:func:`triton_kernels.sparse_lowrank_forward`)."""
    from pixelfly_lab.ops import triton_kernels
    y, t = triton_kernels.sparse_lowrank_forward(x2, values.contiguous(), bias, u, v,
                                                 tables_for(layout_key, x2.device))
    return y, x2.new_empty(x2.shape[0], 0) if t is None else t


triton_forward_op.register_fake(_forward_fake)


@torch.library.custom_op("pixelfly_lab::sparse_lowrank_triton_backward", mutates_args=())
def _triton_backward_op(gy: torch.Tensor, x2: torch.Tensor, values: torch.Tensor, u: Optional[torch.Tensor],
                        v: Optional[torch.Tensor], t: Optional[torch.Tensor], layout_key: int,
                        needed: Sequence[bool]) -> List[torch.Tensor]:
    """(dx2, dvalues, dbias, du, dv) of the 'triton' path; an empty tensor where not ``needed``."""
    from pixelfly_lab.ops import triton_kernels
    grads = triton_kernels.sparse_lowrank_backward(gy, x2, values.contiguous(), u, v, t,
                                                   tables_for(layout_key, x2.device), tuple(needed))
    return [_own(g if need else None, gy) for g, need in zip(grads, needed)]


_triton_backward_op.register_fake(_backward_fake)


torch.library.register_autograd("pixelfly_lab::sparse_lowrank_triton", _backward_with(_triton_backward_op),
                                setup_context=_setup_context)
