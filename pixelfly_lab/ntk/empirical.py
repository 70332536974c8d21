"""Empirical neural tangent kernel (NTK) of any PyTorch model: exact, fast and memory-bounded.

For a network f(x; theta) with O outputs and trainable parameters theta (P numbers), the
empirical NTK at the current parameters is

    K(x, x')[o, o'] = sum_p  d f_o(x) / d theta_p  *  d f_o'(x') / d theta_p  =  J(x) J(x')^T,

an (O, O) block per pair of examples; traced over outputs (the default) it is sum_o K[o, o].
Every example is evaluated on its own (a batch of one), so layers that mix a batch (BatchNorm
in training mode) see what they would see at batch size one. The model is used as it is: call
``model.eval()`` first to switch dropout off.

Four ways to compute the same kernel (``method=``), all exact to rounding:

* ``'loop'``: the reference, an explicit autograd loop over examples and outputs that builds J
  row by row. Obviously correct, slow; for tests and tiny problems.
* ``'jacobian'``: Jacobian contraction. ``vmap(jacrev)`` gives J for a chunk of examples, then
  one GEMM contracts it. Cost ~ N O [backward] + N1 N2 O P (traced).
* ``'ntvp'``: NTK-vector products. A VJP turns each output of x2 into a parameter tangent
  J(x2)^T e, a JVP pushes it through x1: a column of K without forming J(x1). Cost
  ~ N1 N2 O [forward]; in theory it beats contraction's N1 N2 O^2 P for untraced kernels, but
  on CPU its batched JVPs ran 3-10x slower than one GEMM on the MLPs we measured, so 'auto'
  never takes it. It is an independent check and suits a kernel against very few examples.
* ``'structured'``: structured derivatives (:mod:`pixelfly_lab.ntk.structured`). For a layer
  y = x W^T + b with input a and output cotangent g_o, d f_o / d W = g_o a^T, so a weight's
  kernel is <g_o(x), g_o'(x')> <a(x), a(x')>: O out + in per pair instead of O out in, and no
  Jacobian with respect to W is formed; block-sparse weights sum over their stored blocks.
  Parameters of modules without a rule (LayerNorm, Monarch, embeddings) fall back to Jacobian
  contraction; every rule is verified on the first example against autograd.

``'auto'`` takes 'structured' when its rules cover at least half of the trainable parameters
(MLPs, Mixers, ViTs and their sparse versions; it is then 10-100x faster than contraction and
needs memory ~ N O width instead of N O P), else 'jacobian'.

Memory: ``max_memory`` (bytes; default a quarter of the free memory) bounds the largest
intermediates. Examples are processed in chunks and parameters in groups (whole tensors while
they fit, else slices). Per-chunk features (Jacobians, or activations and cotangents) are
cached across the kernel's blocks when they fit -- the symmetric case (x2 None) then computes
every Jacobian once and contracts only the upper block triangle -- or recomputed per block
when that costs less than cutting the parameters into more groups.

References:
    Jacot, Gabriel, Hongler. "Neural Tangent Kernel." NeurIPS 2018. arXiv 1806.07572.
    Novak, Sohl-Dickstein, Schoenholz. "Fast Finite Width Neural Tangent Kernel." ICML 2022.
        arXiv 2206.08720 (Jacobian contraction, NTK-vector products, structured derivatives).
    Dao, Chen et al. "Pixelated Butterfly." ICLR 2022. arXiv 2112.00029 (NTK distance of
        sparse models to the dense model).
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pixelfly_lab.ntk.distances import (ASYMMETRIC_METRICS, DISTANCE_METRICS, SCALE_FREE_METRICS, kernel_distance,
                                        spectra)
from pixelfly_lab.ntk.methods import Problem, compute
from pixelfly_lab.outputs import check_output_fn, model_output

# kernel_distance, spectra and the metric names live in .distances; named here too, where the package,
# the studies and the tests import them.
__all__ = ["METHODS", "DISTANCE_METRICS", "SCALE_FREE_METRICS", "empirical_ntk", "kernel_distance",
           "seed_spread", "spectra"]

METHODS = ("auto", "loop", "jacobian", "ntvp", "structured")


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, *,
                  method: str = "auto", trace: bool = True, chunk_size: int | None = None,
                  max_memory: int | None = None, progress: bool | None = None,
                  output_fn=None) -> torch.Tensor:
    """Empirical NTK K = J(x1) J(x2)^T of ``model`` at its current parameters.

    Attention runs on PyTorch's math kernel of ``scaled_dot_product_attention`` while the kernel
    is computed: it is made of batched matmuls, so vmap vectorises it, where the fused CPU
    kernel has no batching rule and vmap would fall back to a loop over examples and outputs.

    Args:
        model: any nn.Module mapping a batch (B, *E) to outputs (B, ...), returned as a tensor,
            a mapping with 'logits' or an object with ``.logits`` (a Hugging Face model's
            output); the Jacobian is taken with respect to every parameter with
            ``requires_grad`` (for sparse layers: their stored values, so the kernel is the
            sparse model's own).
        x1: (N1, *E) inputs.
        x2: (N2, *E) inputs, or None for K(x1, x1) (each Jacobian computed once).
        method: 'auto', 'loop', 'jacobian', 'ntvp' or 'structured' (see the module docstring).
        trace: sum over outputs (default, the usual scalar kernel) or keep the (O, O) blocks.
        chunk_size: examples per chunk; None derives it from ``max_memory``.
        max_memory: bytes the largest intermediates may take (default: a quarter of
            the device's free memory, see :func:`default_max_memory`).
        progress: show a progress bar over kernel blocks (None: tqdm's default, on a terminal).
        output_fn: optional callable output -> (B, ...) tensor choosing what the kernel is of,
            e.g. ``lambda out: out.logits[:, -1]`` for the last position's logits.

    Returns:
        (N1, N2) kernel if ``trace`` else (N1, N2, O, O), in the model's dtype, on x1's device.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> empirical_ntk(net, torch.randn(5, 3)).shape
        torch.Size([5, 5])
    """
    with sdpa_kernel(SDPBackend.MATH):
        prob = _setup(model, x1, x2, method, trace, chunk_size, max_memory, progress, output_fn)
        return compute(prob, method, chunk_size)



def _setup(model, x1, x2, method, trace, chunk_size, max_memory, progress, output_fn=None) -> Problem:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_output_fn(output_fn)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if not isinstance(trace, bool):
        raise TypeError(f"trace must be a bool, got {type(trace).__name__}")
    for name, value in (("chunk_size", chunk_size), ("max_memory", max_memory)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    for name, x in (("x1", x1), ("x2", x2)):
        if name == "x2" and x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise TypeError(f"{name} must be a tensor with a leading batch axis, got "
                            f"{type(x).__name__}{tuple(getattr(x, 'shape', ()))}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); it needs >= 1 example")
    symmetric = x2 is None or x2 is x1
    if not symmetric:
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"x2's examples have shape {tuple(x2.shape[1:])} but x1's have "
                             f"{tuple(x1.shape[1:])}; x1 and x2 must have the same feature shape")
        if x2.device != x1.device or x2.dtype != x1.dtype:
            raise ValueError(f"x2 is {x2.dtype} on {x2.device} but x1 is {x1.dtype} on {x1.device}")
    named = dict(model.named_parameters())
    trainable = [name for name, p in named.items() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters (none with requires_grad=True); "
                         "the NTK is a gradient inner product and needs at least one")
    devices = {p.device for p in named.values()}
    if devices != {x1.device}:
        raise ValueError(f"model's parameters are on {sorted(map(str, devices))} but x1 is on {x1.device}")
    base = {name: t.detach() for name, t in [*named.items(), *model.named_buffers()]}
    with torch.no_grad():
        out = model_output(model(x1[:1]), output_fn)
    if out.dim() < 1 or out.shape[0] != 1:
        raise TypeError(f"model must return a tensor with a batch axis (or output_fn must pick one); for a "
                        f"batch of one it gave {type(out).__name__}{tuple(out.shape)}")
    dtype = named[trainable[0]].dtype
    budget = max(1, (max_memory or default_max_memory(x1.device)) // (torch.finfo(dtype).bits // 8))
    return Problem(model, base, trainable, x1, x1 if symmetric else x2, symmetric,
                    out[0].numel(), trace, budget, progress, output_fn)


def default_max_memory(device: torch.device) -> int:
    """A quarter of the memory free on ``device`` (at least 256 MiB; 1 GiB if it cannot be read).

    A quarter leaves room for the model, the data, the (N1, N2) kernel and other programs; when
    the whole Jacobian fits, the computation is then the plain vmap(jacrev) recipe.
    """
    free = None
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as info:
                fields = dict(line.split(":", 1) for line in info)
            free = int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            pass
    return max(256 << 20, free // 4) if free else 1 << 30



def seed_spread(model_factory, x: torch.Tensor, seeds=(0, 1, 2), metrics=DISTANCE_METRICS, *,
                method: str = "auto", output_fn=None) -> pd.DataFrame:
    """The seed-to-seed spread of each kernel distance: the yardstick for a distance to a model.

    A distance between a sparse model's kernel and the dense one's means little alone: two dense
    models that differ only in their initialisation seed are already apart. This builds
    ``model_factory(seed)`` for every seed, computes each empirical NTK K_s = K(x, x), and
    summarises the distance between every pair of them.

    Args:
        model_factory: callable seed -> nn.Module (e.g. ``lambda s: build_model('mlp', data,
            seed=s)``); called once per seed, the model used as returned (call ``.eval()`` in
            the factory to switch dropout off).
        x: (N, *E) inputs.
        seeds: at least two distinct ints; three (the default) is the fewest that gives a
            standard deviation over more than one pair.
        metrics: names from :data:`DISTANCE_METRICS`.
        method, output_fn: passed to :func:`empirical_ntk` (the models may return a mapping or
            an object with ``.logits``, as a Hugging Face model does).

    Returns:
        DataFrame, one row per metric: metric, mean, sd (sample standard deviation over pairs,
        NaN for one pair), min, max, pairs (the number of pairs), scale_free (bool). Symmetric
        metrics use each unordered pair once, asymmetric ones ('relative_frobenius*') both orders.

    Example:
        >>> factory = lambda s: (torch.manual_seed(s), nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)))[1]
        >>> seed_spread(factory, torch.randn(6, 3))['metric'].tolist()
        ['relative_frobenius', 'relative_frobenius_normalized', 'relative_frobenius_centered', 'alignment', 'cka']
    """
    if not callable(model_factory):
        raise TypeError(f"model_factory must be a callable seed -> nn.Module, got {type(model_factory).__name__}")
    seeds = tuple(seeds)
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be at least two distinct ints, got {seeds!r}")
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in DISTANCE_METRICS]
    if unknown or not metrics:
        raise ValueError(f"metrics must be names from {', '.join(DISTANCE_METRICS)}; got {metrics!r}")
    kernels = []
    for seed in seeds:
        model = model_factory(seed)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model_factory({seed}) must return an nn.Module, got {type(model).__name__}")
        kernels.append(empirical_ntk(model, x, method=method, output_fn=output_fn))
    rows = []
    for metric in metrics:
        pairs = [(i, j) for i in range(len(seeds)) for j in range(len(seeds))
                 if i != j and (i < j or metric in ASYMMETRIC_METRICS)]
        values = torch.tensor([kernel_distance(kernels[i], kernels[j], metric) for i, j in pairs],
                              dtype=torch.float64)
        rows.append(dict(metric=metric, mean=values.mean().item(),
                         sd=values.std().item() if len(values) > 1 else float("nan"),
                         min=values.min().item(), max=values.max().item(), pairs=len(pairs),
                         scale_free=metric in SCALE_FREE_METRICS))
    return pd.DataFrame(rows)
