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

import math
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from pixelfly_lab.ntk.structured import (contract_jacobians, contract_term, feature_numel, pair_numel,
                                         structured_features, structured_rules)
from pixelfly_lab.outputs import check_output_fn, model_output

__all__ = ["METHODS", "DISTANCE_METRICS", "SCALE_FREE_METRICS", "empirical_ntk", "kernel_distance",
           "seed_spread", "spectra"]

METHODS = ("auto", "loop", "jacobian", "ntvp", "structured")
DISTANCE_METRICS = ("relative_frobenius", "relative_frobenius_normalized", "relative_frobenius_centered",
                    "alignment", "cka")
# The metrics that ignore each kernel's scale: a claim about kernel *shape* uses one of these.
SCALE_FREE_METRICS = ("relative_frobenius_normalized", "relative_frobenius_centered", "alignment", "cka")
# Metrics that measure k1 against the reference k2 (swapping them changes the value).
_ASYMMETRIC_METRICS = ("relative_frobenius", "relative_frobenius_normalized", "relative_frobenius_centered")
# Transient copies per budgeted element (jacrev's intermediates beside its output).
_OVERHEAD = 2


@dataclass
class _Problem:
    """The model as a pure function of its tensors, and the inputs."""

    model: nn.Module
    base: dict          # every parameter and buffer, detached: the constants of the functions
    trainable: list     # names of the trainable parameters, in model.named_parameters() order
    x1: torch.Tensor
    x2: torch.Tensor    # x1 itself in the symmetric case
    symmetric: bool
    n_out: int
    trace: bool
    budget: int         # max_memory in elements of the working dtype
    progress: bool | None
    output_fn: object = None   # output -> tensor (default: the tensor, ['logits'] or .logits)

    def call(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output tensor for a batch x."""
        return model_output(self.model(x), self.output_fn)

    def forward_one(self, tensors: dict, x: torch.Tensor) -> torch.Tensor:
        """(O,) outputs of one example, the parameters replaced by ``tensors``."""
        return model_output(functional_call(self.model, tensors, (x.unsqueeze(0),)), self.output_fn).reshape(-1)

    def kernel(self) -> torch.Tensor:
        tail = () if self.trace else (self.n_out, self.n_out)
        return torch.zeros((len(self.x1), len(self.x2)) + tail, dtype=self.dtype, device=self.x1.device)

    @property
    def dtype(self) -> torch.dtype:
        """The kernel's dtype: the trainable parameters' (inputs may be integer token ids)."""
        return self.base[self.trainable[0]].dtype


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
        return _compute(prob, method, chunk_size)


def _compute(prob: _Problem, method: str, chunk_size) -> torch.Tensor:
    if method == "loop":
        return _loop_ntk(prob)
    rules = structured_rules(prob) if method in ("auto", "structured") else []
    if method == "auto":
        covered = sum(prob.base[name].numel() for rule in rules for name in rule.params)
        total = sum(prob.base[name].numel() for name in prob.trainable)
        method = "structured" if 2 * covered >= total else "jacobian"
    kernel = prob.kernel()
    if method == "structured" and rules:
        rest = [name for name in prob.trainable if all(name not in r.params for r in rules)]
        rest = _structured_into(prob, rules, kernel, chunk_size, rest)
    else:
        rest = prob.trainable
    if rest:
        _jacobian_into(prob, rest, kernel, chunk_size, ntvp=method == "ntvp")
    return kernel


# ----------------------------------------------------------------------------- input checks
def _setup(model, x1, x2, method, trace, chunk_size, max_memory, progress, output_fn=None) -> _Problem:
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
    return _Problem(model, base, trainable, x1, x1 if symmetric else x2, symmetric,
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


# ----------------------------------------------------------------------------- the reference
def _loop_ntk(prob: _Problem) -> torch.Tensor:
    """J row by row with torch.autograd.grad, one example and one output at a time."""
    params = [p for p in prob.model.parameters() if p.requires_grad]

    def jacobian(x):
        rows = []
        for i in range(len(x)):
            out = prob.call(x[i:i + 1]).reshape(-1)
            for o in range(prob.n_out):
                grads = torch.autograd.grad(out[o], params, retain_graph=True, allow_unused=True)
                rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                       for g, p in zip(grads, params)]))
        return torch.stack(rows).view(len(x), prob.n_out, -1)   # (N, O, P)

    j1 = jacobian(prob.x1)
    j2 = j1 if prob.symmetric else jacobian(prob.x2)
    kernel = torch.einsum("iop,jqp->ijoq", j1, j2)
    return kernel.diagonal(dim1=2, dim2=3).sum(-1) if prob.trace else kernel


# ----------------------------------------------------------------------------- blocked assembly
def _assemble(prob: _Problem, kernel, features, contract, chunk: int, cache: bool, desc: str) -> None:
    """kernel[A, B] += contract(features(A), features(B)) over chunks A of x1 and B of x2.

    ``features(x)`` maps a chunk of inputs to what ``contract`` needs. With ``cache`` every
    chunk's features are computed once and kept; otherwise each block recomputes its x2 side.
    In the symmetric case only blocks B >= A are contracted; the others are their transposes.
    """
    starts1 = list(range(0, len(prob.x1), chunk))
    starts2 = list(range(0, len(prob.x2), chunk))
    pairs = [(a, b) for a in starts1 for b in starts2 if not prob.symmetric or b >= a]
    feats1, feats2 = {}, {}
    if cache:
        feats1 = {a: features(prob.x1[a:a + chunk]) for a in starts1}
        feats2 = feats1 if prob.symmetric else {b: features(prob.x2[b:b + chunk]) for b in starts2}
    current = (None, None)
    for a, b in tqdm(pairs, desc=desc, leave=False, disable=(len(pairs) < 2) or
                     (None if prob.progress is None else not prob.progress)):
        if cache:
            fa, fb = feats1[a], feats2[b]
        else:
            if current[0] != a:
                current = (a, features(prob.x1[a:a + chunk]))
            fa = current[1]
            fb = fa if prob.symmetric and a == b else features(prob.x2[b:b + chunk])
        block = contract(fa, fb)
        kernel[a:a + chunk, b:b + chunk] += block
        if prob.symmetric and b != a:
            block = block.transpose(0, 1)
            kernel[b:b + chunk, a:a + chunk] += block if prob.trace else block.transpose(2, 3)


# ----------------------------------------------------------------------------- Jacobian contraction
def _param_groups(prob: _Problem, names: list, group_size: int) -> list:
    """Pack the parameters ``names`` into groups of (name, start, stop) flat slices.

    Whole tensors are packed in order while they fit; a tensor larger than ``group_size`` is
    cut into slices of its own. Cutting is the last resort: the backward pass computes a
    tensor's whole gradient whichever slice of it is asked for.
    """
    groups, group, room = [], [], group_size
    for name in names:
        size = prob.base[name].numel()
        if size > room and group:
            groups.append(group)
            group, room = [], group_size
        for start in range(0, size, group_size):
            stop = min(size, start + group_size)
            group.append((name, start, stop))
            room -= stop - start
            if room <= 0:
                groups.append(group)
                group, room = [], group_size
    return groups + ([group] if group else [])


def _group_function(prob: _Problem, group: list):
    """f(slices, x) -> (O,) with the parameter slices of ``group`` as the free arguments."""

    def f(slices, x):
        tensors = dict(prob.base)
        for (name, start, stop), piece in zip(group, slices):
            full = tensors[name]
            flat = full.reshape(-1)
            if start > 0 or stop < flat.numel():   # splice the free slice into the constants
                piece = torch.cat([flat[:start], piece, flat[stop:]])
            tensors[name] = piece.view_as(full)
        return prob.forward_one(tensors, x)

    slices = tuple(prob.base[name].reshape(-1)[start:stop] for name, start, stop in group)
    return f, slices


def _computed(prob: _Problem, groups: list) -> int:
    """Jacobian entries per example and output that the backward passes of ``groups`` compute."""
    return sum(prob.base[name].numel() for group in groups for name in {n for n, _, _ in group})


def _plan_groups(prob: _Problem, names: list, chunk_size: int | None):
    """(chunk, groups, cache) with the least Jacobian work within the memory budget.

    Cached: every example's Jacobian of one parameter group stays resident and is computed
    once, so a group holds budget / (N O) parameters. Streamed: only two chunks of examples are
    alive, so a group holds budget / (2 c O), but every block recomputes its x2 chunk. When the
    whole Jacobian fits, cached with one group and one chunk is the plain vmap(jacrev) recipe.
    """
    n1, n2, n_out = len(prob.x1), len(prob.x2), prob.n_out
    n_params = sum(prob.base[name].numel() for name in names)
    usable = max(1, prob.budget // _OVERHEAD)
    n_eval = n1 + (0 if prob.symmetric else n2)
    # default chunk: as many examples as fit with all parameters in one group, at least 8
    chunk = min(max(n1, n2), chunk_size or max(8, usable // (2 * n_out * n_params)))
    chunks1 = math.ceil(n1 / chunk)
    stream_evals = n1 + (n1 * (chunks1 - 1) / 2 if prob.symmetric else chunks1 * n2)
    cached = _param_groups(prob, names, max(1, usable // (n_eval * n_out)))
    streamed = _param_groups(prob, names, max(1, usable // (2 * chunk * n_out)))
    if n_eval * _computed(prob, cached) <= stream_evals * _computed(prob, streamed):
        # everything resident anyway: one chunk makes one GEMM per tensor, as the recipe does
        return chunk_size or max(n1, n2), cached, True
    return chunk, streamed, False


def _jacobian_into(prob: _Problem, names: list, kernel, chunk_size, ntvp: bool) -> None:
    """Add the kernel of the parameters ``names`` by Jacobian contraction or NTK-vector products."""
    chunk, groups, cache = _plan_groups(prob, names, chunk_size)
    for group in groups:
        f, slices = _group_function(prob, group)
        if ntvp:
            contract = _ntvp_contract(prob, f, slices)
            _assemble(prob, kernel, lambda x: x, contract, chunk, True, "NTK (ntvp)")
            continue

        def features(x, f=f, slices=slices):
            return vmap(jacrev(f), in_dims=(None, 0))(slices, x)     # per slice (c, O, len)

        def contract(fa, fb):
            return sum(contract_jacobians(ja, jb, prob.trace) for ja, jb in zip(fa, fb))

        _assemble(prob, kernel, features, contract, chunk, cache, "NTK (jacobian)")


def _ntvp_contract(prob: _Problem, f, slices):
    """Block K(xa, xb) from VJPs over xb's outputs followed by JVPs through xa."""

    def contract(xa, xb):
        (ca, cb), n_out = (len(xa), len(xb)), prob.n_out
        _, pullback = vjp(lambda s: vmap(f, in_dims=(None, 0))(s, xb), slices)
        basis = torch.eye(cb * n_out, dtype=prob.dtype, device=xb.device)
        (tangents,) = vmap(pullback)(basis.view(cb * n_out, cb, n_out))  # each (cb O, slice)
        push = lambda t: jvp(lambda s: vmap(f, in_dims=(None, 0))(s, xa), (slices,), (t,))[1]
        cols = vmap(push)(tangents)                                     # (cb O, ca, O)
        block = cols.view(cb, n_out, ca, n_out).permute(2, 0, 3, 1)     # (ca, cb, O, O)
        return block.diagonal(dim1=2, dim2=3).sum(-1) if prob.trace else block

    return contract


def _structured_into(prob: _Problem, rules: list, kernel, chunk_size, rest: list) -> list:
    """Add the rules' parameters' kernel; their features are small, so cached when they fit.

    The parameters ``rest`` without a rule join the same backward passes (their Jacobians beside
    the rules' cotangents) when all of theirs fit the memory budget at once; returns those left.
    """
    usable = max(1, prob.budget // _OVERHEAD)
    n_eval = len(prob.x1) + (0 if prob.symmetric else len(prob.x2))
    extra = tuple(rest) if n_eval * prob.n_out * sum(prob.base[n].numel() for n in rest) <= usable // 2 else ()
    features = structured_features(prob, rules, extra)
    terms = [term for rule in rules for term in rule.terms] + [None] * len(extra)
    first = features(prob.x1[:1])
    per_example = feature_numel(first)
    # the largest Gram stack a block contracts, per pair of examples
    per_pair = max(pair_numel(t, f, prob.n_out, prob.trace) for t, f in zip(terms, first))
    chunk = chunk_size or max(1, min(max(len(prob.x1), len(prob.x2)), math.isqrt(usable // per_pair),
                                     usable // per_example))

    def contract(fa, fb):
        return sum(contract_term(t, ta, tb, prob.trace) for t, ta, tb in zip(terms, fa, fb))

    _assemble(prob, kernel, features, contract, chunk, n_eval * per_example <= usable, "NTK (structured)")
    return [] if extra else rest


# ----------------------------------------------------------------------------- kernels compared
def _check_kernels(k1, k2) -> tuple:
    for name, k in (("k1", k1), ("k2", k2)):
        if not isinstance(k, torch.Tensor) or k.dim() not in (2, 4):
            raise TypeError(f"{name} must be a 2-D (N1, N2) or 4-D (N1, N2, O, O) kernel tensor, got "
                            f"{type(k).__name__}{tuple(getattr(k, 'shape', ()))}")
    if k1.shape != k2.shape:
        raise ValueError(f"k1 and k2 must have the same shape, got k1 {tuple(k1.shape)} and k2 {tuple(k2.shape)}")
    if k1.numel() == 0:
        raise ValueError("k1 and k2 are empty")
    return k1.detach().double(), k2.detach().to(k1.device).double()


def _as_matrix(k: torch.Tensor) -> torch.Tensor:
    """(N1, N2) as is; (N1, N2, O, O) as the (N1 O, N2 O) matrix of all output pairs."""
    if k.dim() == 2:
        return k
    n1, n2, o1, o2 = k.shape
    return k.permute(0, 2, 1, 3).reshape(n1 * o1, n2 * o2)


def _centred(m: torch.Tensor) -> torch.Tensor:
    """H M H with H = I - 1 1^T / N: M less its row and column means, plus its grand mean."""
    return m - m.mean(0, keepdim=True) - m.mean(1, keepdim=True) + m.mean()


def kernel_distance(k1: torch.Tensor, k2: torch.Tensor, metric: str = "relative_frobenius") -> float:
    """Distance between two kernels on the same examples (k2 is the reference, e.g. dense).

    Args:
        k1, k2: kernels of the same shape, (N1, N2) or (N1, N2, O, O).
        metric:

            * 'relative_frobenius': ||K1 - K2||_F / ||K2||_F. Depends on scale: invariant only to
              scaling both kernels by the same factor, so a kernel that is merely smaller or larger
              (a sparse model's trace) reads as far. Asymmetric (K2 is the reference).
            * 'relative_frobenius_normalized': the same for the trace-normalised kernels
              K / tr K (square kernels only). Scale-free: invariant to scaling either kernel by a
              positive factor. Asymmetric. An NTK at initialisation often has a large constant
              (mean) part, which then dominates this distance.
            * 'relative_frobenius_centered': the same for the centred, trace-normalised kernels
              H K H / tr(H K H), H = I - 1 1^T / N (square kernels only). Scale-free and blind to
              a constant added to a kernel (H 1 = 0), so it compares the part of the kernel that
              tells examples apart. Asymmetric.
            * 'alignment': 1 - <K1, K2>_F / (||K1||_F ||K2||_F), one minus the cosine between the
              kernels. Scale-free (either kernel, positive factor), symmetric.
            * 'cka': the alignment of the centred kernels H K H, H = I - 1 1^T / N (square
              kernels only; Cortes et al. 2012, Kornblith et al. 2019). Scale-free, symmetric,
              and also blind to a constant added to a kernel.

            A claim about the *shape* of a kernel uses a scale-free metric
            (:data:`SCALE_FREE_METRICS`) and compares it with the dense seed-to-seed spread of
            :func:`seed_spread`.

    Returns:
        float, 0 for identical kernels; computed in float64.

    Example:
        >>> k = torch.eye(3)
        >>> abs(kernel_distance(2 * k, k, 'alignment')) < 1e-12
        True
        >>> kernel_distance(2 * k, k, 'relative_frobenius')
        1.0
    """
    if metric not in DISTANCE_METRICS:
        raise ValueError(f"metric must be one of {', '.join(DISTANCE_METRICS)}; got {metric!r}")
    m1, m2 = (_as_matrix(k) for k in _check_kernels(k1, k2))
    if metric in ("relative_frobenius_normalized", "relative_frobenius_centered"):
        if m1.shape[0] != m1.shape[1]:
            raise ValueError(f"metric={metric!r} needs square kernels K(x, x), got k1 of shape {tuple(k1.shape)}")
        if metric == "relative_frobenius_centered":
            m1, m2 = (_centred(m) for m in (m1, m2))
        traces = (m1.trace(), m2.trace())
        if any(t <= 0 for t in traces):
            raise ValueError(f"metric={metric!r} needs kernels with a positive trace, got traces "
                             f"{float(traces[0]):.3g} and {float(traces[1]):.3g}")
        m1, m2 = m1 / traces[0], m2 / traces[1]
    if metric.startswith("relative_frobenius"):
        norm = torch.linalg.matrix_norm(m2)
        if norm == 0:
            raise ValueError("k2 is zero; a relative distance needs a nonzero reference kernel")
        return float(torch.linalg.matrix_norm(m1 - m2) / norm)
    if metric == "cka":
        if m1.shape[0] != m1.shape[1]:
            raise ValueError(f"metric='cka' needs square kernels K(x, x), got k1 of shape {tuple(k1.shape)}")
        m1, m2 = (_centred(m) for m in (m1, m2))
    norms = torch.linalg.matrix_norm(m1) * torch.linalg.matrix_norm(m2)
    if norms == 0:
        raise ValueError(f"k1 or k2 is zero{' after centring' if metric == 'cka' else ''}; "
                         f"metric={metric!r} is undefined")
    return float(1.0 - (m1 * m2).sum() / norms)


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
                 if i != j and (i < j or metric in _ASYMMETRIC_METRICS)]
        values = torch.tensor([kernel_distance(kernels[i], kernels[j], metric) for i, j in pairs],
                              dtype=torch.float64)
        rows.append(dict(metric=metric, mean=values.mean().item(),
                         sd=values.std().item() if len(values) > 1 else float("nan"),
                         min=values.min().item(), max=values.max().item(), pairs=len(pairs),
                         scale_free=metric in SCALE_FREE_METRICS))
    return pd.DataFrame(rows)


def spectra(kernels, normalize: bool = True) -> pd.DataFrame:
    """Eigenvalue spectra of symmetric kernels K(x, x), largest first.

    Args:
        kernels: one (N, N) kernel, or a mapping name -> (N, N) kernel.
        normalize: also give each eigenvalue divided by the trace (the spectrum's shape).

    Returns:
        DataFrame with columns name, index (0 = largest), eigenvalue[, normalized].

    Example:
        >>> spectra(torch.diag(torch.tensor([1.0, 3.0])))['eigenvalue'].tolist()
        [3.0, 1.0]
    """
    if isinstance(kernels, torch.Tensor):
        kernels = {"kernel": kernels}
    if not hasattr(kernels, "items"):
        raise TypeError(f"kernels must be a tensor or a mapping name -> tensor, got {type(kernels).__name__}")
    rows = []
    for name, k in kernels.items():
        if not isinstance(k, torch.Tensor) or k.dim() != 2 or k.shape[0] != k.shape[1] or k.numel() == 0:
            raise ValueError(f"kernels[{name!r}] must be a square (N, N) kernel, got "
                             f"{tuple(getattr(k, 'shape', ()))}")
        k = k.detach().double()
        values = torch.linalg.eigvalsh((k + k.T) / 2).flip(0).cpu()
        frame = {"name": name, "index": range(len(values)), "eigenvalue": values.numpy()}
        if normalize:
            frame["normalized"] = (values / values.sum()).numpy()
        rows.append(pd.DataFrame(frame))
    return pd.concat(rows, ignore_index=True)
