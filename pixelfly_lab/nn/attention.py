"""Pixelfly attention: block-sparse attention on a flat block butterfly layout + Performer, as Scatterbrain.

The attention scores of a length-T sequence form a T x T matrix, sparsified as a weight is: the
Pixelfly paper (Dao, Chen et al., ICLR 2022, arXiv 2112.00029, Sec. 4-5, the Long Range Arena
experiment) keeps the blocks of a flat block butterfly layout of the scores and adds a low-rank
term. The two are combined as Scatterbrain (Chen et al., NeurIPS 2021, arXiv 2110.15343) does:
with E_ij = exp(s_ij), s_ij = q_i . k_j / sqrt(D), and Performer's positive random features
phi (Choromanski et al., ICLR 2021, arXiv 2009.14794; E[phi(q) . phi(k)] = exp(q . k / sqrt(D))),

    A_ij = E~_ij / sum_j' E~_ij',   E~_ij = E_ij on the support S (the kept blocks),
                                    E~_ij = phi(q_i) . phi(k_j) off it,

so the low-rank estimate is discounted on the support and no score is counted twice. The
numerator and denominator are computed in O(T * (fan-in * b + m)) without forming T x T:

    sum_j E~_ij [v_j, 1] = exp(L_i) [o_i, 1]                    (block_sparse_attention: o, L = lse)
                          + phi(q_i) . sum_j phi(k_j) [v_j, 1]     (all keys; prefix sums if causal)
                          - sum_{j in S(i)} phi(q_i) . phi(k_j) [v_j, 1]   (the discount on S)

``lowrank_features=0`` leaves the sparse part alone. Baseline layouts 'bigbird', 'local' and
'random' at the same budget come from :func:`pixelfly_lab.structure.patterns.make_pattern`.

The default layout is 'connected' (not the paper's): the paper's flat block butterfly at these
sizes is block-diagonal (no block outside a group of 2^n_factors is ever reached, however many
layers are stacked; :func:`pixelfly_lab.structure.connectivity.block_connectivity`), so only the
noisy random features link distant tokens. 'connected' keeps the butterfly strides that span the
whole block grid (every block reaches every other within ceil(log2(T/b)) layers), widens a local
band with what the budget leaves, and uses no random features unless asked: features cost 2 m / T
of the budget (they may fit into what the band leaves unused, so the layout can stay the same) and
lengthen the layer's step; at equal budget they left (or raised) the error against dense softmax
for sharp attention (temperature up to 1, random and local q, k) and lowered it for nearly uniform
rows, where ``lowrank_features=m`` is worth its cost (notebook 08 measures both, the error with
:meth:`PixelflyAttention.error_against_dense`).
The paper's layout stays available as ``layout='pixelfly'``.

Example:
    >>> attn = PixelflyAttention(64, heads=2, seq_len=128, block_size=16)      # connected, no features
    >>> x = torch.randn(3, 128, 64)
    >>> attn(x).shape
    torch.Size([3, 128, 64])
    >>> torch.allclose(attn.attention_matrix(x).sum(-1), torch.ones(3, 2, 128))
    True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pixelfly_lab._checks import check_int
from pixelfly_lab._compile import assume_constant
from pixelfly_lab.ops import native
from pixelfly_lab.ops.attention import block_sparse_attention, block_sparse_linear_attention
from pixelfly_lab.ops.registry import derived, register_layout, registered_layout
from pixelfly_lab.structure.masks import layout_to_mask
from pixelfly_lab.nn.attention_layouts import ATTENTION_LAYOUTS, attention_layout, connected_layout
from pixelfly_lab.nn.random_features import draw_feature_weights, performer_features

__all__ = ["PixelflyAttention", "attention_layout", "connected_layout", "ATTENTION_LAYOUTS", "ATTENTION_ROUTES",
           "MASKED_SDPA_BELOW", "MASKED_SDPA_BELOW_PYTORCH", "masked_sdpa_below"]

# How the sparse-only layer (no random features) computes its block-sparse attention:
# 'kernel' is pixelfly_lab.ops.attention.block_sparse_attention (work O(T * fan-in * b));
# 'masked_sdpa' is one F.scaled_dot_product_attention call with the layout's boolean (T, T) mask
# (the same values; work O(T^2) in torch's fused kernel); 'auto' takes 'masked_sdpa' below
# MASKED_SDPA_BELOW tokens when the input is on the CPU, and the kernel from there and on every other
# device (the crossover was measured on a CPU; on CUDA the Triton kernel is the path).
ATTENTION_ROUTES = ("auto", "kernel", "masked_sdpa")

# The crossover of 'auto', in tokens, for CPU inputs only, with the compiled CPU kernel
# (pixelfly_lab/ops/native_attention.py). Measured on the team's 2-core Xeon (one thread, dim 512,
# 8 heads, block 32, default layout, forward+backward of the layer against its SDPA twin,
# bench/attention_route_bench.py, interleaved medians of 7, load 0.5): T = 128 kernel 0.91x,
# masked SDPA 0.95x; T = 256 kernel 1.04x (causal 1.07x), masked SDPA 0.98x (0.97x); T = 512 kernel
# 1.27x, masked 0.98x. Without the compiled kernel (no compiler, PIXELFLY_NATIVE=0) the PyTorch chunk
# path's crossover applies, MASKED_SDPA_BELOW_PYTORCH (same bench, load 3.5-4.8: masked SDPA 8-25%
# faster at T = 256, the chunks 5-9% faster at T = 512). :func:`masked_sdpa_below` gives the one in force.
MASKED_SDPA_BELOW = 256
MASKED_SDPA_BELOW_PYTORCH = 512


def masked_sdpa_below() -> int:
    """The crossover 'auto' uses on the CPU: :data:`MASKED_SDPA_BELOW` where the compiled attention
    kernel is built, else :data:`MASKED_SDPA_BELOW_PYTORCH`."""
    return MASKED_SDPA_BELOW if native.load("attention_cpu") is not None else MASKED_SDPA_BELOW_PYTORCH


def _causal_linear_attention(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor,
                             block_size: int) -> torch.Tensor:
    """sum_{j <= i} (phi_q_i . phi_k_j) v_j by blocks: prefix sums of per-block states + the diagonal block.

    Memory O(T b + (T / b) m Dv) instead of the O(T m Dv) of a per-token prefix sum.
    """
    B, H, T, m = phi_q.shape
    R, b, Dv = T // block_size, block_size, v.shape[-1]
    q5, k5, v5 = phi_q.reshape(B, H, R, b, m), phi_k.reshape(B, H, R, b, m), v.reshape(B, H, R, b, Dv)
    state = k5.transpose(-1, -2) @ v5                          # (B, H, R, m, Dv): one block's keys
    before = state.cumsum(2) - state                           # blocks strictly before block r
    within = (q5 @ k5.transpose(-1, -2)).tril() @ v5           # j <= i inside block r
    return (q5 @ before + within).reshape(B, H, T, Dv)


@assume_constant
def _element_mask(key: int, causal: bool, device) -> torch.Tensor:
    """The boolean (T, T) mask of a registered layout (j <= i too when causal) on ``device``, built
    once per (key, causal, device) by the registry: the 'masked_sdpa' route's ``attn_mask``."""
    def build(entry, dev):
        mask = layout_to_mask(entry.layout, entry.block_size)
        return (torch.tril(mask) if causal else mask).to(dev)
    return derived(key, "sdpa_mask_causal" if causal else "sdpa_mask", build, device)


class PixelflyAttention(nn.Module):
    """Multi-head self-attention, sparse on a block layout of the scores plus Performer off it.

    q, k, v and output projections are separate nn.Linear layers named as in
    :class:`pixelfly_lab.training.models.Attention` (so :func:`pixelfly_lab.nn.sparsification.sparsify` can swap
    them too). The attention is the Scatterbrain combination of the module docstring.

    The block layout is registered with the layout registry at construction
    (:func:`pixelfly_lab.ops.registry.register_layout`): a forward or backward passes its key and
    reads, plans or hashes nothing. The random features' projection W is drawn once into the
    buffer ``feature_weights`` (persistent: a state dict carries it; :meth:`redraw_features` draws
    anew), so the layer compiles with ``fullgraph=True``. Examples of a batch never mix: every
    shift is per example, row and head.

    Args:
        dim: model width, divisible by ``heads``.
        heads: attention heads (head dim D = dim / heads).
        seq_len: the longest T. A shorter T (a multiple of ``block_size``) gets a layout of its own,
            planned by the same rule at T with the same features (registered on its first call);
            :attr:`density` reports the T of the latest call.
        budget: fraction of the T^2 scores computed, random features included (m features cost
            2 m / T). None: for 'connected' the smallest connected layout (1 + ceil(log2(T/b))
            blocks a row: density 6/32 at T=1024, b=32; 8/128 at T=4096), 0.25 for the others.
        block_size: b; 32 matches GPU tiles and the authors' released code; small T wants 8-16.
        causal: decoder attention (j <= i); the Performer part then uses prefix sums.
        lowrank_features: m random features; None plans them from the budget for 'pixelfly' (the
            paper's split) and uses none for the others, 'connected' (the default) included.
        global_tokens: the first tokens see and are seen by all (rounded up to blocks), on top of
            the budget.
        layout: 'connected' (default: :func:`connected_layout`), 'pixelfly' (the paper's flat block
            butterfly and planner split), 'bigbird', 'local' or 'random'.
        seed: seeds the layout's random blocks and the random features.
        route: 'auto' (default), 'kernel' or 'masked_sdpa' (:data:`ATTENTION_ROUTES`): how a layer
            without random features computes its sparse attention; 'auto' uses one masked
            ``F.scaled_dot_product_attention`` for CPU inputs below :data:`MASKED_SDPA_BELOW` tokens
            (faster there on one CPU thread, the same values) and the block-sparse kernel from there
            and on every other device (CUDA: the Triton kernel); :meth:`route_at` says which.

    Example:
        >>> attn = PixelflyAttention(32, 2, 64, block_size=8, causal=True)
        >>> attn(torch.randn(1, 64, 32)).shape
        torch.Size([1, 64, 32])
    """

    def __init__(self, dim: int, heads: int, seq_len: int, *, budget: float | None = None, block_size: int = 32,
                 causal: bool = False, lowrank_features: int | None = None, global_tokens: int = 0,
                 layout: str = "connected", seed: int = 0, route: str = "auto", device=None, dtype=None):
        super().__init__()
        if route not in ATTENTION_ROUTES:
            raise ValueError(f"route must be one of {ATTENTION_ROUTES}, got {route!r}")
        check_int("dim", dim)
        check_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        block_layout, features = attention_layout(layout, seq_len, budget, block_size,
                                                  lowrank_features=lowrank_features,
                                                  global_tokens=global_tokens, seed=seed, causal=causal)
        self.dim, self.heads, self.seq_len, self.block_size, self.causal = dim, heads, seq_len, block_size, causal
        self.layout_name, self.features, self.seed = layout, features, seed
        self.budget, self.global_tokens = budget, global_tokens
        if route == "masked_sdpa" and features:
            raise ValueError(f"route='masked_sdpa' computes the sparse part alone; the layer has {features} random "
                             f"features (lowrank_features=0, or route='auto' / 'kernel')")
        self.route = route
        # the CPU crossover in force, read once here (a plain int: forward compiles without a graph break);
        # asked of the compiled kernel only where 'auto' can take masked SDPA (it builds on first use)
        self._masked_below = masked_sdpa_below() if route == "auto" and not features else MASKED_SDPA_BELOW_PYTORCH
        self._last_len = seq_len
        # one registry key per sequence length used (the built one now, shorter ones on first use)
        self._keys_by_length = {seq_len: register_layout(block_layout, block_size)}
        # buffers follow the ambient device like the parameters (meta included: reset_parameters refills them)
        where = torch.get_default_device() if device is None else torch.device(device)
        self.register_buffer("layout", block_layout.to(where), persistent=False)
        head_dim = dim // heads
        weights = (draw_feature_weights(head_dim, features, seed) if features
                   else torch.zeros(0, head_dim, dtype=torch.float64, device="cpu"))
        self.register_buffer("feature_weights", weights.to(where))
        factory = {"device": device, "dtype": dtype}
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim, **factory) for _ in range(4))

    def reset_parameters(self) -> None:
        """Restore the buffers (the layout, the features' W from ``seed``), e.g. after ``to_empty``;
        the q, k, v and proj layers reset themselves (:func:`pixelfly_lab.nn.materialize.materialize`)."""
        self.layout.detach().copy_(registered_layout(self._keys_by_length[self.seq_len]).layout)
        self._draw_features()

    def _draw_features(self) -> None:
        """The features' W, drawn from ``self.seed`` into its buffer (nothing when there are no features)."""
        if self.features:
            weights = draw_feature_weights(self.dim // self.heads, self.features, self.seed)
            self.feature_weights.detach().copy_(weights.to(self.feature_weights.dtype))

    def redraw_features(self, seed: int | None = None) -> None:
        """Draw the random features' projection W anew (with ``seed``, or the next seed after the last)."""
        self.seed = self.seed + 1 if seed is None else check_int("seed", seed, 0)
        self._draw_features()

    def layout_for(self, seq_len: int) -> torch.Tensor:
        """The CPU block layout (T/b, T/b) the layer uses at sequence length T (planned on first use)."""
        return registered_layout(self.layout_key(seq_len)).layout

    def density_at(self, seq_len: int) -> float:
        """Fraction of the T^2 scores computed at T: kept blocks plus the features' share 2 m / T."""
        return self.layout_for(seq_len).float().mean().item() + 2 * self.features / seq_len

    @property
    def density(self) -> float:
        """:meth:`density_at` the sequence length of the latest call (``seq_len`` before any call)."""
        return self.density_at(self._last_len)

    def layout_key(self, T: int) -> int:
        """The layout registry key of the layout used at sequence length T (planned on first use):
        what :func:`pixelfly_lab.ops.attention.block_sparse_attention` takes."""
        key = self._keys_by_length.get(T)
        if key is None:
            options = dict(lowrank_features=self.features, global_tokens=min(self.global_tokens, T),
                           seed=self.seed, causal=self.causal)
            try:
                layout, _ = attention_layout(self.layout_name, T, self.budget, self.block_size, **options)
            except ValueError:
                if self.layout_name != "connected":
                    raise
                # below the floor at this shorter T: the smallest connected layout (density says so)
                layout, _ = attention_layout(self.layout_name, T, None, self.block_size, **options)
            key = self._keys_by_length[T] = register_layout(layout, self.block_size)
        return key

    def choice(self) -> str:
        """What the layout rule chose at ``seq_len``, in words (the repr shows it)."""
        R = self.seq_len // self.block_size
        layout = self.layout_for(self.seq_len)
        fan_in = layout.sum(1)
        words = f"{R}x{R} blocks of {self.block_size}, {int(fan_in.min())}-{int(fan_in.max())} a row"
        if self.layout_name == "connected":
            band = connected_layout(self.seq_len, self.block_size, None if self.budget is None else
                                    self.budget - 2 * self.features / self.seq_len, causal=self.causal)[1]
            words += f": butterfly strides 1..{1 << max(R - 1, 0).bit_length() >> 1} + band {band}"
        if self.global_tokens:
            words += f", {-(-self.global_tokens // self.block_size)} global block(s)"
        return words

    def route_at(self, seq_len: int, device=None) -> str:
        """'kernel' or 'masked_sdpa': how a call at sequence length T on ``device`` computes the attention.

        Args:
            seq_len: T.
            device: the input's device (None: the layer's parameters').

        Returns:
            The fixed ``route``, or for 'auto' (:data:`ATTENTION_ROUTES`): 'masked_sdpa' when there are
            no random features, T < :func:`masked_sdpa_below` and the device is the CPU (where the
            crossover was measured), 'kernel' otherwise.
        """
        if self.route != "auto":
            return self.route
        device = self.q.weight.device if device is None else torch.device(device)
        on_cpu = device.type == "cpu"
        return "masked_sdpa" if self.features == 0 and on_cpu and seq_len < self._masked_below else "kernel"

    def __setstate__(self, state):
        """Unpickling (torch.save of a whole model, copy.deepcopy, spawned workers): a layer saved before
        routes existed gets 'auto', and the registry keys are this process's, so the built layout (its
        buffer came with the state) is registered again and shorter lengths are planned again on use."""
        state.setdefault("route", "auto")
        state["_masked_below"] = (masked_sdpa_below() if state["route"] == "auto" and not state.get("features")
                                  else MASKED_SDPA_BELOW_PYTORCH)   # this process's kernels decide it
        state.setdefault("_last_len", state["seq_len"])
        super().__setstate__(state)
        if not self.layout.is_meta:
            self._keys_by_length = {self.seq_len: register_layout(self.layout.cpu(), self.block_size)}

    def extra_repr(self) -> str:
        route = self.route_at(self.seq_len)
        if self.route == "auto" and self.features == 0:
            route += f" (auto: masked SDPA on the CPU below T={self._masked_below}, kernel from there)"
        return (f"heads={self.heads}, seq_len={self.seq_len}, layout={self.layout_name!r} ({self.choice()}), "
                f"features={self.features}, causal={self.causal}, density={self.density:.3f}, route={route}")

    def _heads(self, x: torch.Tensor):
        """(B, T, C) -> q, k, v (B, heads, T, C / heads) and the layout key for T."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, T, dim), got {tuple(x.shape)}")
        B, T, C = x.shape
        if C != self.dim:
            raise ValueError(f"x must have width dim={self.dim} (shape (B, T, {self.dim})), got {tuple(x.shape)}")
        if T == 0:
            raise ValueError("x has sequence length T=0: attention needs at least one block of tokens")
        if T > self.seq_len:
            raise ValueError(f"sequence length {T} is above the built length seq_len={self.seq_len}: build the "
                             f"layer with seq_len >= {T}")
        if T % self.block_size:
            raise ValueError(f"sequence length {T} is not a multiple of block_size={self.block_size}: pad it to "
                             f"{-(-T // self.block_size) * self.block_size}")
        self._last_len = T

        def split(t):
            return t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        return split(self.q(x)), split(self.k(x)), split(self.v(x)), self.layout_key(T)

    def _log_features(self, q, k):
        # softmax(q.k / sqrt(D)) is Performer's exp(q.k / t) at temperature t = sqrt(D)
        t = math.sqrt(q.shape[-1])
        return (performer_features(q, t, self.features, weights=self.feature_weights),
                performer_features(k, t, self.features, weights=self.feature_weights))

    def _attend(self, q, k, v, key):
        if self.features == 0:
            if self.route_at(q.shape[2], q.device) == "masked_sdpa":
                mask = _element_mask(key, self.causal, q.device)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return block_sparse_attention(q, k, v, key, self.block_size, causal=self.causal)
        exact, lse = block_sparse_attention(q, k, v, key, self.block_size, causal=self.causal, return_lse=True)
        log_q, log_k = self._log_features(q, k)
        # Shifts per example and head (never across the batch: a NaN in one example stays there),
        # shared by both parts of a row, cancel in the normalisation; they keep the largest exact or
        # estimated score of a row near 1, so low temperatures do not overflow.
        key_shift = log_k.amax((-2, -1), keepdim=True).detach()                  # (B, H, 1, 1)
        shift = torch.maximum(lse, log_q.amax(-1) + key_shift[..., 0]).detach()  # (B, H, T)
        phi_q = (log_q - (shift.unsqueeze(-1) - key_shift)).exp()
        phi_k = (log_k - key_shift).exp()
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)                    # [v, 1]: numerator, denominator
        if self.causal:
            everywhere = _causal_linear_attention(phi_q, phi_k, v1, self.block_size)
        else:
            everywhere = phi_q @ (phi_k.transpose(-1, -2) @ v1)
        off_support = everywhere - block_sparse_linear_attention(phi_q, phi_k, v1, key, self.block_size,
                                                                 causal=self.causal)
        weight = (lse - shift).exp().to(v.dtype).unsqueeze(-1)                  # exp(L_i - shift_i)
        numerator = weight * exact + off_support[..., :-1]
        denominator = (weight + off_support[..., -1:]).clamp_min(torch.finfo(v.dtype).tiny)
        return numerator / denominator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> (B, T, dim); T <= seq_len, a multiple of block_size."""
        q, k, v, key = self._heads(x)
        y = self._attend(q, k, v, key)
        B, T, C = x.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def attention_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """The dense (B, heads, T, T) attention matrix A the module applies: out = proj(A V).

        O(T^2) memory, for teaching and tests. Rows sum to 1; with ``causal``, A_ij = 0 for j > i.
        """
        q, k, _, _ = self._heads(x)
        return self.attention_weights(q, k)

    def attention_weights(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The dense (B, heads, T, T) matrix the layer's attention gives per-head queries and keys.

        Args:
            q, k: (B, heads, T, D) with D = dim / heads (e.g. chosen Q, K to study the approximation).

        Returns:
            (B, heads, T, T), rows summing to 1, scores q.k / sqrt(D) exact on the layout at T and
            estimated by the random features off it.
        """
        if q.dim() != 4 or k.shape != q.shape or q.shape[-1] != self.dim // self.heads:
            raise ValueError(f"q and k must have one shape (B, heads, T, {self.dim // self.heads}), "
                             f"got {tuple(q.shape)} and {tuple(k.shape)}")
        key = self.layout_key(q.shape[2])
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        support = layout_to_mask(registered_layout(key).layout.to(q.device), self.block_size)
        allowed = torch.ones_like(support)
        if self.causal:
            support, allowed = torch.tril(support), torch.tril(allowed)
        if self.features == 0:
            return torch.softmax(scores.masked_fill(~support, float("-inf")), -1)
        log_q, log_k = self._log_features(q, k)
        key_shift = log_k.amax((-2, -1), keepdim=True)
        exact_max = scores.masked_fill(~support, float("-inf")).amax(-1, keepdim=True)
        shift = torch.maximum(exact_max, log_q.amax(-1, keepdim=True) + key_shift)
        estimate = (log_q - (shift - key_shift)).exp() @ (log_k - key_shift).exp().transpose(-1, -2)
        unnormalised = torch.where(support, (scores - shift).exp(), estimate) * allowed
        return unnormalised / unnormalised.sum(-1, keepdim=True)

    def error_against_dense(self, q: torch.Tensor, k: torch.Tensor) -> float:
        """Relative Frobenius error ||A - softmax(q k^T / sqrt(D))||_F / ||softmax(...)||_F of
        :meth:`attention_weights` (dense causal softmax when ``causal``); inputs as there."""
        A = self.attention_weights(q, k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if self.causal:
            scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
        dense = torch.softmax(scores, -1)
        return ((A - dense).norm() / dense.norm()).item()
