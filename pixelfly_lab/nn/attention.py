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

Example:
    >>> attn = PixelflyAttention(64, heads=2, seq_len=128, budget=0.25, block_size=16)
    >>> x = torch.randn(3, 128, 64)
    >>> attn(x).shape
    torch.Size([3, 128, 64])
    >>> torch.allclose(attn.attention_matrix(x).sum(-1), torch.ones(3, 2, 128))
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pixelfly_lab._checks import check_budget, check_int
from pixelfly_lab.ops.attention import block_sparse_attention, block_sparse_linear_attention
from pixelfly_lab.structure.masks import layout_to_mask
from pixelfly_lab.structure.patterns import make_pattern
from pixelfly_lab.nn.random_features import performer_features

__all__ = ["PixelflyAttention", "attention_layout", "ATTENTION_LAYOUTS"]

ATTENTION_LAYOUTS = ("pixelfly", "bigbird", "local", "random")


def attention_layout(name: str, seq_len: int, budget: float, block_size: int, *,
                     lowrank_features: int | None = None, global_tokens: int = 0,
                     seed: int = 0) -> tuple[torch.Tensor, int]:
    """The block layout of the T x T attention scores and the number of random features.

    The budget is the fraction of the T^2 scores computed, the low-rank part included: m random
    features cost 2 T m, like a rank-m factor (Sec. 3 of the Pixelfly paper counts a rank-r
    term as r (in + out)).

    * 'pixelfly' with ``lowrank_features=None``: :func:`pixelfly_lab.structure.patterns.plan_pixelfly` on
      the (T, T) score matrix splits the budget into a flat block butterfly layout and a rank,
      used as the number of features, exactly as for a weight.
    * otherwise the features are ``lowrank_features`` (None means 0 for the baselines: they are
      the sparse-only methods the paper compares against), and the layout takes what is left:
      the densest flat block butterfly ('pixelfly'), or ``make_pattern``'s 'bigbird', 'local',
      'random' within budget - 2 m / T.
    * the diagonal blocks are always kept, so every token sees itself and no row is empty
      ('random' is asked for one block row less to make room; 'local' and 'pixelfly' already
      hold the diagonal; 'bigbird' below 3 T/b blocks may exceed the budget by the diagonal).
    * ``global_tokens`` g: the first ceil(g / b) block rows and columns are dense (the first g
      tokens attend to and are attended by all), on top of the budget.

    Args:
        name: one of :data:`ATTENTION_LAYOUTS`.
        seq_len: T, a multiple of ``block_size``.
        budget: fraction of T^2 in (0, 1].
        block_size: b, the edge of a block.
        lowrank_features: m >= 0, or None for the rule above.
        global_tokens: g >= 0.
        seed: seeds the random blocks of 'random' and 'bigbird'.

    Returns:
        (layout bool (T/b, T/b), m).

    Example:
        >>> layout, m = attention_layout("pixelfly", 1024, 0.25, 32)
        >>> layout.sum(1)[:4].tolist(), m        # 6 blocks of 32 per row (3/16) + 32 features (1/16)
        ([6, 6, 6, 6], 32)
    """
    if name not in ATTENTION_LAYOUTS:
        raise ValueError(f"layout must be one of {ATTENTION_LAYOUTS}, got {name!r}")
    budget = check_budget(budget)
    check_int("block_size", block_size)
    check_int("seq_len", seq_len)
    if seq_len % block_size:
        raise ValueError(f"seq_len={seq_len} is not a multiple of block_size={block_size}")
    check_int("global_tokens", global_tokens, 0)
    if global_tokens > seq_len:
        raise ValueError(f"global_tokens={global_tokens} exceeds seq_len={seq_len}")
    R = seq_len // block_size
    if name == "pixelfly" and lowrank_features is None:
        pattern = make_pattern("pixelfly", seq_len, seq_len, budget, block_size)
        layout, features = pattern.layout.clone(), pattern.rank
    else:
        features = 0 if lowrank_features is None else check_int("lowrank_features", lowrank_features, 0)
        sparse_budget = budget - 2 * features / seq_len - (1 / R if name == "random" else 0)
        if sparse_budget <= 0:
            raise ValueError(f"lowrank_features={features} uses the whole budget={budget} at seq_len="
                             f"{seq_len} (m features cost 2 m / T = {2 * features / seq_len:.4f})")
        base = "butterfly" if name == "pixelfly" else name
        layout = make_pattern(base, seq_len, seq_len, sparse_budget, block_size, seed).layout.clone()
    layout |= torch.eye(R, dtype=torch.bool)
    n_global = -(-global_tokens // block_size)
    layout[:n_global] = True
    layout[:, :n_global] = True
    return layout, features


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


class PixelflyAttention(nn.Module):
    """Multi-head self-attention, sparse on a block layout of the scores plus Performer off it.

    q, k, v and output projections are separate nn.Linear layers named as in
    :class:`pixelfly_lab.training.models.Attention` (so :func:`pixelfly_lab.nn.sparsification.sparsify` can swap
    them too). The attention is the Scatterbrain combination of the module docstring.

    Args:
        dim: model width, divisible by ``heads``.
        heads: attention heads (head dim D = dim / heads).
        seq_len: the longest T; inputs may be shorter (a multiple of ``block_size``): the top-left
            corner of the layout is used.
        budget: fraction of the T^2 scores computed, low-rank included. 0.25 by default, the
            budget the paper's MLPs use: at T = 1024, b = 32 the plan keeps 6 blocks of 32 per
            row (3/16 of the scores) and 32 random features (1/16).
        block_size: b; 32 matches GPU tiles and the authors' released code; small T wants 8-16.
        causal: decoder attention (j <= i); the Performer part then uses prefix sums.
        lowrank_features: m random features; None plans them from the budget ('pixelfly') or
            uses none (baselines); 0 gives the sparse part alone.
        global_tokens: the first tokens see and are seen by all (rounded up to blocks).
        layout: 'pixelfly' (flat block butterfly), 'bigbird', 'local' or 'random'.
        seed: seeds the layout's random blocks and the random features (fixed after construction).

    Example:
        >>> attn = PixelflyAttention(32, 2, 64, block_size=8, causal=True, lowrank_features=0)
        >>> attn(torch.randn(1, 64, 32)).shape
        torch.Size([1, 64, 32])
    """

    def __init__(self, dim: int, heads: int, seq_len: int, *, budget: float = 0.25, block_size: int = 32,
                 causal: bool = False, lowrank_features: int | None = None, global_tokens: int = 0,
                 layout: str = "pixelfly", seed: int = 0):
        super().__init__()
        check_int("dim", dim)
        check_int("heads", heads)
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        block_layout, features = attention_layout(layout, seq_len, budget, block_size,
                                                  lowrank_features=lowrank_features,
                                                  global_tokens=global_tokens, seed=seed)
        self.heads, self.seq_len, self.block_size, self.causal = heads, seq_len, block_size, causal
        self.layout_name, self.features, self.seed = layout, features, seed
        self.register_buffer("layout", block_layout, persistent=False)
        # the kernels read the layout on the host (plans and index tables are cached per layout):
        # a CPU copy that .to(device) leaves alone spares a device-to-host copy (a sync) per call
        self._host_layout = block_layout.clone()
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    @property
    def density(self) -> float:
        """Fraction of the T^2 scores computed exactly, plus the features' share 2 m / T."""
        return self.layout.float().mean().item() + 2 * self.features / self.seq_len

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, seq_len={self.seq_len}, layout={self.layout_name!r}, "
                f"block_size={self.block_size}, features={self.features}, causal={self.causal}, "
                f"density={self.density:.3f}")

    def _heads(self, x: torch.Tensor):
        """(B, T, C) -> q, k, v (B, heads, T, C / heads) and the layout for T."""
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, T, dim), got {tuple(x.shape)}")
        B, T, C = x.shape
        if T > self.seq_len or T % self.block_size:
            raise ValueError(f"sequence length {T} must be <= seq_len={self.seq_len} and a multiple of "
                             f"block_size={self.block_size}")
        def split(t):
            return t.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        R = T // self.block_size
        return split(self.q(x)), split(self.k(x)), split(self.v(x)), self._host_layout[:R, :R]

    def _log_features(self, q, k):
        # softmax(q.k / sqrt(D)) is Performer's exp(q.k / t) at temperature t = sqrt(D)
        t = math.sqrt(q.shape[-1])
        return (performer_features(q, t, self.features, self.seed),
                performer_features(k, t, self.features, self.seed))

    def _attend(self, q, k, v, layout):
        if self.features == 0:
            return block_sparse_attention(q, k, v, layout, self.block_size, causal=self.causal)
        exact, lse = block_sparse_attention(q, k, v, layout, self.block_size, causal=self.causal,
                                            return_lse=True)
        log_q, log_k = self._log_features(q, k)
        # One shift per row, shared by both parts, cancels in the normalisation; it keeps the
        # largest exact or estimated score of a row near 1, so low temperatures do not overflow.
        key_shift = log_k.amax().detach()
        shift = torch.maximum(lse, log_q.amax(-1) + key_shift).detach()          # (B, H, T)
        phi_q = (log_q - (shift - key_shift).unsqueeze(-1)).exp()
        phi_k = (log_k - key_shift).exp()
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1)                    # [v, 1]: numerator, denominator
        if self.causal:
            everywhere = _causal_linear_attention(phi_q, phi_k, v1, self.block_size)
        else:
            everywhere = phi_q @ (phi_k.transpose(-1, -2) @ v1)
        off_support = everywhere - block_sparse_linear_attention(phi_q, phi_k, v1, layout, self.block_size,
                                                                 causal=self.causal)
        weight = (lse - shift).exp().to(v.dtype).unsqueeze(-1)                  # exp(L_i - shift_i)
        numerator = weight * exact + off_support[..., :-1]
        denominator = (weight + off_support[..., -1:]).clamp_min(torch.finfo(v.dtype).tiny)
        return numerator / denominator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, dim) -> (B, T, dim)."""
        q, k, v, layout = self._heads(x)
        y = self._attend(q, k, v, layout)
        B, T, C = x.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def attention_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """The dense (B, heads, T, T) attention matrix A the module applies: out = proj(A V).

        O(T^2) memory, for teaching and tests. Rows sum to 1; with ``causal``, A_ij = 0 for j > i.
        """
        q, k, _, layout = self._heads(x)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        support = layout_to_mask(layout.to(q.device), self.block_size)
        allowed = torch.ones_like(support)
        if self.causal:
            support, allowed = torch.tril(support), torch.tril(allowed)
        if self.features == 0:
            return torch.softmax(scores.masked_fill(~support, float("-inf")), -1)
        log_q, log_k = self._log_features(q, k)
        key_shift = log_k.amax()
        exact_max = scores.masked_fill(~support, float("-inf")).amax(-1)
        shift = torch.maximum(exact_max, log_q.amax(-1) + key_shift).unsqueeze(-1)
        estimate = (log_q - (shift - key_shift)).exp() @ (log_k - key_shift).exp().transpose(-1, -2)
        unnormalised = torch.where(support, (scores - shift).exp(), estimate) * allowed
        return unnormalised / unnormalised.sum(-1, keepdim=True)
