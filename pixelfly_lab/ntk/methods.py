"""How the empirical NTK is computed: the problem, the blocked assembly, and the four methods.

:func:`pixelfly_lab.ntk.empirical.empirical_ntk` checks its arguments into a :class:`Problem` (the
model as a pure function of its tensors, the inputs, the memory budget) and :func:`compute` fills
the kernel by the method asked: the explicit autograd loop (the reference), Jacobian contraction,
NTK-vector products, or structured derivatives (:mod:`pixelfly_lab.ntk.structured`) with Jacobian
contraction for the parameters no rule covers. The kernel is assembled block by block over chunks
of examples, and parameters are cut into groups, so the largest intermediates stay within
``Problem.budget``; the trade-offs are written in :mod:`pixelfly_lab.ntk.empirical`'s docstring.

References:
    Novak, Sohl-Dickstein, Schoenholz. "Fast Finite Width Neural Tangent Kernel." ICML 2022.
        arXiv 2206.08720 (Jacobian contraction, NTK-vector products, structured derivatives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap
from tqdm.auto import tqdm

from pixelfly_lab.ntk.structured import (contract_jacobians, contract_term, feature_numel, pair_numel,
                                         structured_features, structured_rules)
from pixelfly_lab.outputs import model_output

__all__ = ["Problem", "compute"]

# Transient copies per budgeted element (jacrev's intermediates beside its output).
_OVERHEAD = 2


@dataclass
class Problem:
    """The model as a pure function of its tensors, the inputs, and the memory budget."""

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


def compute(prob: Problem, method: str, chunk_size) -> torch.Tensor:
    """The (N1, N2) or (N1, N2, O, O) kernel of ``prob`` by ``method`` (checked by the caller).

    'auto' takes 'structured' when its rules cover at least half of the trainable parameters.
    """
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



# ----------------------------------------------------------------------------- the reference
def _loop_ntk(prob: Problem) -> torch.Tensor:
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
def _assemble(prob: Problem, kernel, features, contract, chunk: int, cache: bool, desc: str) -> None:
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
def _param_groups(prob: Problem, names: list, group_size: int) -> list:
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


def _group_function(prob: Problem, group: list):
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


def _computed(prob: Problem, groups: list) -> int:
    """Jacobian entries per example and output that the backward passes of ``groups`` compute."""
    return sum(prob.base[name].numel() for group in groups for name in {n for n, _, _ in group})


def _plan_groups(prob: Problem, names: list, chunk_size: int | None):
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


def _jacobian_into(prob: Problem, names: list, kernel, chunk_size, ntvp: bool) -> None:
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


def _ntvp_contract(prob: Problem, f, slices):
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


def _structured_into(prob: Problem, rules: list, kernel, chunk_size, rest: list) -> list:
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
