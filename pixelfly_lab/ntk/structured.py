"""Structured derivatives for the empirical NTK: kernels of linear layers without their Jacobians.

For a layer y = x W^T + b applied to an input a (over extra axes S, e.g. tokens) with output
cotangent g_o = d f_o / d y, the Jacobian of output o with respect to W is sum_s g_os a_s^T.
Hence, without extra axes,

    < d f_o(x) / d W, d f_o'(x') / d W > = < g_o(x), g_o'(x') > < a(x), a(x') >,

so a (out x in) weight costs O out + in per pair of examples instead of O out in, and no
Jacobian with respect to W is formed. For a weight stored as the blocks of a layout, the sum
runs over the stored blocks only: K = sum_{(r, c) in layout} G_r * A_c with G_r and A_c the
Gram matrices of block r of g and block c of a. A bias is a weight on the constant input 1; a
low-rank W = U V^T is two such terms (U with input V^T a; V^T with cotangent U^T g). With
extra axes the factored Jacobian sum_s g_s a_s^T is contracted directly.

Each module type with a rule is listed in :func:`rule_for`; every rule is checked on the
first example against autograd (a weight also used outside its module's forward would break
it) and dropped with a warning if it does not hold. The cotangents g of all layers come from
one vmap(jacrev) with respect to zero "taps" added to the layers' outputs.

Reference: Novak, Sohl-Dickstein, Schoenholz. "Fast Finite Width Neural Tangent Kernel."
ICML 2022, arXiv 2206.08720, Sec. 4 (structured derivatives).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import jacrev, vmap

from pixelfly_lab.nn.base import StructuredLinear
from pixelfly_lab.nn.linear_like import is_conv1d

__all__ = ["contract_jacobians", "structured_rules", "structured_features", "feature_numel", "pair_numel",
           "contract_term"]


def contract_jacobians(ja: torch.Tensor, jb: torch.Tensor, trace: bool) -> torch.Tensor:
    """(ca, O, P) x (cb, O, P) -> (ca, cb) traced, or (ca, cb, O, O)."""
    (ca, n_out, _), cb = ja.shape, jb.shape[0]
    if trace:
        return ja.reshape(ca, -1) @ jb.reshape(cb, -1).T
    block = ja.reshape(ca * n_out, -1) @ jb.reshape(cb * n_out, -1).T
    return block.view(ca, n_out, cb, n_out).permute(0, 2, 1, 3)


@dataclass
class _Term:
    """One trainable tensor W_t of a module, with d f_o / d W_t = left_o (x) right on its blocks.

    ``left(a, g)`` -> (c, O, S, out_t) is the cotangent at the term's output and ``right(a, g)``
    -> (c, S, in_t) its input, from the module's input a (c, S, in) and output cotangent
    g (c, O, S, out), both over the extra axes S the weight is shared across. The parameter
    stores the blocks of ``layout`` (row-major, (nnz, bo, bi)), or W_t^T when ``transposed``.
    """

    param: str
    layout: torch.Tensor        # bool (R, C); (1, 1) for a dense weight
    block: tuple                # (bo, bi)
    left: object
    right: object
    transposed: bool = False


@dataclass
class _Rule:
    """A module's terms, and the shape of its output in one forward of a single example."""

    module: nn.Module
    terms: list
    output_shape: tuple | None = None   # set by structured_rules' one probe; the taps take this shape

    @property
    def params(self) -> tuple:
        return tuple(term.param for term in self.terms)


def _output_side(a, g):
    return g


def _input_side(a, g):
    return a


def _ones_side(a, g):
    return a.new_ones(a.shape[:-1] + (1,))   # a bias is a weight on the constant input 1


def _bias_terms(module, name) -> list:
    if getattr(module, "bias", None) is None:
        return []
    return [_Term(name("bias"), _DENSE, (module.bias.shape[0], 1), _output_side, _ones_side)]


def _linear_terms(module, name, weight, layout, block) -> list:
    """Terms of y = x W^T + bias: the weight ``weight`` on ``layout`` and the bias."""
    return [_Term(name(weight), layout, block, _output_side, _input_side)] + _bias_terms(module, name)


def _lowrank_terms(name, u: torch.Tensor, v: torch.Tensor) -> list:
    """Terms of y = U (V^T x): d/dU = g (V^T x)^T and d/dV^T = (U^T g) x^T (V is stored (in, r))."""
    (out_f, rank), in_f = u.shape, v.shape[0]
    return [_Term(name("u"), _DENSE, (out_f, rank), _output_side, lambda a, g: a @ v.detach()),
            _Term(name("v"), _DENSE, (rank, in_f), lambda a, g: g @ u.detach(), _input_side, True)]


_DENSE = torch.ones(1, 1, dtype=torch.bool)
_OUTPUT_CHUNK = 32


def rule_for(prefix: str, module: nn.Module) -> _Rule | None:
    """Terms of ``module`` if it has a rule: nn.Linear and Conv1D by exact type; a structured layer
    by what it says its W is made of (:meth:`pixelfly_lab.nn.base.StructuredLinear.linear_parts`)."""
    name = lambda local: f"{prefix}.{local}" if prefix else local
    kind = type(module)
    if kind is nn.Linear:
        return _Rule(module, _linear_terms(module, name, "weight", _DENSE, tuple(module.weight.shape)))
    if is_conv1d(module):    # y = x W + b with W stored (in, out): the transpose of nn.Linear's
        in_f, out_f = module.weight.shape
        return _Rule(module, [_Term(name("weight"), _DENSE, (out_f, in_f), _output_side, _input_side, True)]
                     + _bias_terms(module, name))
    parts = module.linear_parts() if isinstance(module, StructuredLinear) else None
    if parts is None:            # no rule (a gated, masked, Monarch or butterfly layer): autograd
        return None
    terms = []
    for part in parts:
        if part.kind == "block_sparse":
            b = part.block_size
            terms.append(_Term(name(part.names[0]), part.layout, (b, b), _output_side, _input_side))
        else:                    # 'lowrank': W_part = U V^T
            u_name, v_name = part.names
            terms += _lowrank_terms(lambda local, u=u_name, v=v_name: name(u if local == "u" else v),
                                    module.get_parameter(u_name), module.get_parameter(v_name))
    return _Rule(module, terms + _bias_terms(module, name))


def structured_rules(prob) -> list:
    """A rule per module that has one, runs once per forward and alone uses its parameters.

    Frozen parameters drop out of a rule; a parameter is claimed by the outermost rule only.
    """
    trainable = set(prob.trainable)
    owners = {}
    for module in prob.model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    named = dict(prob.model.named_parameters())
    rules, claimed = [], set()
    for prefix, module in prob.model.named_modules():
        rule = rule_for(prefix, module)
        if rule is None:
            continue
        params = [named.get(term.param) for term in rule.terms]
        if any(p is None or owners[id(p)] != 1 for p in params) or claimed & set(rule.params):
            continue
        claimed |= set(rule.params)
        rule.terms = [term for term in rule.terms if term.param in trainable]
        if rule.terms:
            rules.append(rule)
    if not rules:
        return []
    # the one probe of the model's outputs: the taps need one call per forward, with the input
    # passed positionally, and take the output's shape (kept on the rule for structured_features)
    calls = _probe_outputs(prob, [rule.module for rule in rules])
    single = []
    for rule in rules:
        if [n for _, n in calls[id(rule.module)]] == [1]:
            rule.output_shape = tuple(calls[id(rule.module)][0][0])
            single.append(rule)
    return _verified(prob, single)


def _probe_outputs(prob, modules: list) -> dict:
    """id(module) -> (output shape, number of positional inputs) of each call in one forward."""
    shapes = {id(m): [] for m in modules}
    hooks = [m.register_forward_hook(lambda m, i, o: shapes[id(m)].append((o.shape, len(i)))) for m in modules]
    try:
        with torch.no_grad():
            prob.call(prob.x1[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _gram_form(prob, term: _Term, positions: int) -> bool:
    """Whether a term shared over ``positions`` > 1 positions is contracted as Gram matrices.

    Traced, its kernel is sum_{s, s'} <a_s, a'_s'> sum_o <g_os, g'_os'> over the stored blocks:
    S^2 (O out_t + in_t) per pair of examples, no Jacobian kept. Its factored Jacobian
    sum_s g_os a_s^T costs O S P_t per example to build, O P_t per pair to contract and O P_t
    of memory per example: cheaper for few outputs and positions (a Mixer's class scores), far
    dearer for a language model's (T, V) logits. Untraced kernels always take the Jacobian.
    """
    if not prob.trace:
        return False
    n1, n2 = len(prob.x1), len(prob.x2)
    n_eval, pairs = (n1, n1 * (n1 + 1) // 2) if prob.symmetric else (n1 + n2, n1 * n2)
    (bo, bi), (rows, cols) = term.block, term.layout.shape
    p_t = int(term.layout.sum()) * bo * bi
    gram = pairs * positions ** 2 * (prob.n_out * rows * bo + cols * bi + rows * cols)
    direct = (n_eval * positions + pairs) * prob.n_out * p_t
    return gram < direct


def structured_features(prob, rules: list, extra: tuple = ()):
    """features(x) for a chunk: per term of every rule, its factors or its Jacobian; then per name
    in ``extra`` (parameters without a rule) its Jacobian (c, O, P), from the same backward passes.
    ``rules`` come from :func:`structured_rules` (each knows its output shape: no probe here).

    Without extra axes (S = 1) a term's features are (left (c, O, 1, out_t), right (c, 1, in_t)),
    contracted as Gram matrices. A weight shared over S > 1 positions keeps its factors too when
    :func:`_gram_form` says the Gram form costs less; else it gets its factored Jacobian
    sum_s left_s (x) right_s (c, O, P_t), built once here.

    A zero "tap" is added to each rule's output; d f / d tap is the output cotangent g, so one
    vmap(jacrev) over the taps gives every g without differentiating any weight.
    """
    state = {"index": {id(r.module): k for k, r in enumerate(rules)}}

    def hook(module, inputs, output):
        state["inputs"].append(inputs[0])
        return output + state["deltas"][state["index"][id(module)]]

    def f(deltas, values, x):
        state.update(deltas=deltas, inputs=[])
        tensors = {**prob.base, **dict(zip(extra, values))} if extra else prob.base
        return prob.forward_one(tensors, x), tuple(state["inputs"])

    deltas = tuple(torch.zeros(r.output_shape, dtype=prob.dtype, device=prob.x1.device) for r in rules)
    values = tuple(prob.base[name] for name in extra)
    # Many outputs (a language model's T x V logits): backward passes in chunks of outputs, whose
    # activations stay in cache (2x faster at 520 outputs per example on one CPU thread; same values)
    chunk = _OUTPUT_CHUNK if prob.n_out > 4 * _OUTPUT_CHUNK else None

    def features(x):
        handles = [r.module.register_forward_hook(hook) for r in rules]
        try:
            (grads, jacobians), inputs = vmap(jacrev(f, argnums=(0, 1), has_aux=True, chunk_size=chunk),
                                              in_dims=(None, None, 0))(deltas, values, x)
        finally:
            for h in handles:
                h.remove()
        c, feats = len(x), []
        for rule, a, g in zip(rules, inputs, grads):
            a, g = a.reshape(c, -1, a.shape[-1]), g.reshape(c, prob.n_out, -1, g.shape[-1])
            for term in rule.terms:
                left, right = term.left(a, g), term.right(a, g)
                factored = a.shape[1] == 1 or _gram_form(prob, term, a.shape[1])
                feats.append((left, right) if factored else _direct_jacobian(term, left, right))
        return feats + [jac.reshape(c, prob.n_out, -1) for jac in jacobians]

    return features


def _direct_jacobian(term: _Term, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(c, O, P_term) Jacobian sum_s left_s (x) right_s on the term's blocks, in storage order."""
    c, n_out, s, _ = left.shape
    (bo, bi), (rows, cols) = term.block, term.layout.nonzero().T.to(left.device)   # host layout: no device sync
    left = left.reshape(c, n_out, s, -1, bo)[:, :, :, rows]           # (c, O, S, nnz, bo)
    right = right.reshape(c, s, -1, bi)[:, :, cols]                   # (c, S, nnz, bi)
    jac = torch.einsum("aoskw,aski->aokwi", left, right)              # (c, O, nnz, bo, bi)
    return (jac.transpose(-1, -2) if term.transposed else jac).reshape(c, n_out, -1)


def _projected_gradient(term: _Term, feature, weights: torch.Tensor) -> torch.Tensor:
    """(P_t,) gradient of sum_o weights_o f_o for the first example of a chunk's feature."""
    if isinstance(feature, torch.Tensor):
        return weights @ feature[0]
    left, right = feature
    left = torch.einsum("o,osw->sw", weights, left[0])[None, None]     # (1, 1, S, out_t)
    return _direct_jacobian(term, left, right[:1])[0, 0]


def feature_numel(features: list) -> int:
    """Elements held by a chunk's features."""
    return sum(f.numel() if isinstance(f, torch.Tensor) else f[0].numel() + f[1].numel() for f in features)


def pair_numel(term: _Term, feature, n_out: int, trace: bool) -> int:
    """Elements of the largest intermediate per pair of examples when contracting ``feature``."""
    if isinstance(feature, torch.Tensor):
        return 1 if trace else n_out ** 2
    positions = feature[0].shape[2]
    return (term.layout.shape[0] + term.layout.shape[1]) * positions ** 2 * (1 if trace else n_out ** 2)


def _verified(prob, rules: list) -> list:
    """Keep the rules whose rebuilt gradient matches autograd's on the first example."""
    x0 = prob.x1[:1]
    feats = iter(structured_features(prob, rules)(x0))
    named = dict(prob.model.named_parameters())
    weights = torch.randn(prob.n_out, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = weights.to(device=x0.device, dtype=prob.dtype)
    params = [named[name] for rule in rules for name in rule.params]
    grads = dict(zip(map(id, params), torch.autograd.grad(prob.call(x0).reshape(-1) @ weights, params,
                                                          allow_unused=True)))
    kept = []
    for rule in rules:
        error = norm = 0.0
        for term in rule.terms:
            true = grads[id(named[term.param])]
            true = torch.zeros_like(named[term.param]) if true is None else true
            error += float((_projected_gradient(term, next(feats), weights) - true.reshape(-1)).square().sum())
            norm += float(true.square().sum())
        tol = 1e-9 if prob.dtype == torch.float64 else 1e-3
        if math.sqrt(error) <= tol * (1.0 + math.sqrt(norm)):
            kept.append(rule)
        else:
            warnings.warn(f"the structured NTK rule of {type(rule.module).__name__} does not reproduce "
                          f"its gradient (parameter used outside its forward?); using Jacobian contraction")
    return kept


def contract_term(term: _Term, fa, fb, trace: bool) -> torch.Tensor:
    """One term's kernel block: sum over its stored blocks (r, c) of G_r * A_c (Gram matrices)."""
    if isinstance(fa, torch.Tensor):     # a Jacobian: a weight shared over extra axes, or no rule
        return contract_jacobians(fa, fb, trace)
    (left_a, right_a), (left_b, right_b) = fa, fb
    (bo, bi), (ca, n_out, positions), cb = term.block, left_a.shape[:3], left_b.shape[0]
    if positions > 1:    # traced only (_gram_form): sum over position pairs (s, t) as well
        left_a, left_b = left_a.reshape(ca, n_out, positions, -1, bo), left_b.reshape(cb, n_out, positions, -1, bo)
        gram_g = torch.einsum("aosrw,botrw->rabst", left_a, left_b)                 # (R, ca, cb, S, S)
        gram_a = torch.einsum("ascw,btcw->cabst", right_a.reshape(ca, positions, -1, bi),
                              right_b.reshape(cb, positions, -1, bi))               # (C, ca, cb, S, S)
        mixed = torch.einsum("rc,cabst->rabst", term.layout.to(gram_a), gram_a)
        return (gram_g * mixed).sum((0, 3, 4))
    left_a, left_b = left_a.reshape(ca, n_out, -1, bo), left_b.reshape(cb, n_out, -1, bo)
    gram_g = (torch.einsum("aorw,borw->rab", left_a, left_b) if trace
              else torch.einsum("aorw,bprw->rabop", left_a, left_b))        # (R, ca, cb[, O, O])
    gram_a = torch.einsum("acw,bcw->cab", right_a.reshape(ca, -1, bi), right_b.reshape(cb, -1, bi))
    mixed = torch.einsum("rc,cab->rab", term.layout.to(gram_a), gram_a)     # sum over each row's blocks
    return (gram_g * (mixed if trace else mixed[..., None, None])).sum(0)
