"""Target matrices for the expressiveness lab: what a sparsity pattern is asked to approximate.

The Pixelfly paper (Dao, Chen et al., ICLR 2022, arXiv 2112.00029, Sec. 4) argues that flat
butterfly + low-rank approximates the matrices networks need better than sparse or low-rank
alone. This module generates those matrices, all (n, n) and float64 (complex128 for 'dft'):

* unstructured and structured-random: 'gaussian', 'lowrank', 'sparse', 'sparse_lowrank';
* fast transforms: 'dft' (F[j, k] = exp(-2 pi i j k / n) / sqrt(n)), 'dct' (orthonormal
  DCT-II), 'hadamard' (Sylvester, H[j, k] = (-1)^popcount(j & k) / sqrt(n)), 'circulant',
  'toeplitz', 'butterfly' (a random product B_n ... B_4 B_2 of butterfly factors);
* 'attention': softmax(Q K^T / t) row by row, from random Q, K (Q K^T entries ~ N(0, 1)); the
  temperature t moves it from nearly uniform (nearly rank one) at large t to nearly one entry
  per row (nearly sparse) at small t;
* 'weight': a (trained) weight matrix read from a model the user passes.

Example:
    >>> target_matrix('hadamard', 4) * 4
    tensor([[ 1.,  1.,  1.,  1.],
            [ 1., -1.,  1., -1.],
            [ 1.,  1., -1., -1.],
            [ 1., -1., -1.,  1.]], dtype=torch.float64)
"""

from __future__ import annotations

import math

import torch

from pixelfly_lab._checks import check_int, check_number, check_power_of_two
from pixelfly_lab.structure.masks import butterfly_factor_mask
from pixelfly_lab.structure.projections import few_threads

__all__ = ["TARGET_KINDS", "target_matrix", "attention_inputs", "random_butterfly_factors", "digits_mlp",
           "plot_targets"]

TARGET_KINDS = ("gaussian", "lowrank", "sparse", "sparse_lowrank", "dft", "dct", "hadamard",
                "circulant", "toeplitz", "butterfly", "attention", "weight")


def random_butterfly_factors(n: int, seed: int = 0, dtype=torch.float64) -> list[torch.Tensor]:
    """Random butterfly factor matrices B_2, B_4, ..., B_n of size n (strides 1, 2, ..., n/2).

    Each B_{2s} has N(0, 1/2) entries on its support {(r, c): r XOR c in {0, s}}: two entries a
    row, so every row has unit expected squared norm and products neither blow up nor vanish.

    Returns:
        list of log2(n) dense (n, n) tensors, smallest stride first; the butterfly matrix is
        B_n @ ... @ B_2 = ``functools.reduce(torch.matmul, reversed(factors))``.
    """
    check_power_of_two("n", n, 2)
    generator = torch.Generator().manual_seed(seed)
    factors = []
    for i in range(n.bit_length() - 1):
        values = torch.randn(n, n, generator=generator, dtype=dtype) / math.sqrt(2.0)
        factors.append(values * butterfly_factor_mask(n, 1 << i))
    return factors


def attention_inputs(n: int, head_dim: int = 16, seed: int = 0, locality: float = 0.0,
                     dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random queries and keys Q, K of shape (n, head_dim) whose scores Q K^T are ~ N(0, 1).

    With ``locality`` a > 0 both get a positional part sqrt(2) [cos(w_f i), sin(w_f i)]_f with
    w_f = 2 pi f / n, f = 1..head_dim/2, mixed as (G + a Pos) / sqrt(1 + a^2): the score of
    positions i, j then gains a^2 / (1 + a^2) * 2 sum_f cos(w_f (i - j)) / sqrt(head_dim), a
    peak at i = j of width ~ 2n / head_dim, like the local attention of trained models.

    Returns:
        (Q, K), each (n, head_dim), scaled by head_dim^(-1/4) so that (Q K^T)[i, j] has unit
        variance at locality 0.
    """
    check_int("n", n, 1)
    check_int("head_dim", head_dim, 2)
    check_number("locality", locality, include_low=True)
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(n, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(n, head_dim, generator=generator, dtype=dtype)
    if locality:
        freqs = 2 * math.pi * torch.arange(1, head_dim // 2 + 1, dtype=dtype) / n
        angles = torch.arange(n, dtype=dtype)[:, None] * freqs[None, :]            # (n, head_dim/2)
        pos = math.sqrt(2.0) * torch.cat([angles.cos(), angles.sin()], dim=1)
        pos = torch.nn.functional.pad(pos, (0, head_dim - pos.shape[1]))           # odd head_dim
        q = (q + locality * pos) / math.sqrt(1 + locality ** 2)
        k = (k + locality * pos) / math.sqrt(1 + locality ** 2)
    scale = head_dim ** -0.25
    return q * scale, k * scale


def _dft(n, dtype):
    idx = torch.arange(n, dtype=torch.float64)
    # j * k mod n keeps the angle small, so large n loses no precision
    angle = -2 * math.pi * torch.remainder(idx[:, None] * idx[None, :], n) / n
    return torch.polar(torch.ones(n, n, dtype=torch.float64), angle).to(dtype) / math.sqrt(n)


def _dct(n, dtype):
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * j + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(dtype)


def _hadamard(n, dtype):
    check_power_of_two("n", n, 1)
    idx = torch.arange(n)
    bits = idx[:, None] & idx[None, :]
    parity = torch.zeros_like(bits)
    while bool(bits.any()):  # popcount(j & k) mod 2, one bit at a time
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(dtype) / math.sqrt(n)


def _sparse(n, density, generator, dtype):
    keep = torch.rand(n, n, generator=generator, dtype=torch.float64) < density
    return torch.randn(n, n, generator=generator, dtype=dtype) * keep


def _lowrank(n, rank, generator, dtype):
    u = torch.randn(n, rank, generator=generator, dtype=dtype)
    v = torch.randn(n, rank, generator=generator, dtype=dtype)
    return u @ v.T


def _weight(model, n, name):
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module for kind='weight', got {type(model).__name__}")
    if name is not None:
        weight = model.get_parameter(name)
        if weight.dim() != 2:
            raise ValueError(f"parameter {name!r} of model is not a matrix (shape {tuple(weight.shape)})")
    else:
        matrices = [p for p in model.parameters() if p.dim() == 2]
        if not matrices:
            raise ValueError("model has no 2-D parameter to read a weight matrix from")
        weight = max(matrices, key=torch.Tensor.numel)  # the largest; ties go to the first
    weight = weight.detach().to(torch.float64)
    if n is None:
        return weight.clone()
    if min(weight.shape) < n:
        raise ValueError(f"n={n} is larger than the weight's shape {tuple(weight.shape)}")
    return weight[:n, :n].clone()  # leading block: weights are exchangeable, any block is typical


def target_matrix(kind: str, n: int | None, seed: int = 0, *, rank: int | None = None,
                  density: float = 0.05, temperature: float = 1.0, head_dim: int = 16,
                  locality: float = 0.0, model: torch.nn.Module | None = None,
                  name: str | None = None, dtype=torch.float64) -> torch.Tensor:
    """An (n, n) matrix of the given kind, normalised to unit Frobenius norm (not 'weight').

    Args:
        kind: one of :data:`TARGET_KINDS` (see the module docstring for the definitions).
        n: size; a power of two for 'hadamard' and 'butterfly'. For 'weight' None means the
            whole weight (possibly rectangular), else its leading (n, n) block.
        seed: seeds every random kind.
        rank: rank of 'lowrank' and of the low-rank part of 'sparse_lowrank'; default
            max(1, n // 16), a low rank that still fills several directions.
        density: fraction of non-zeros of 'sparse' and of the sparse part of 'sparse_lowrank';
            5% is well below every budget the lab compares.
        temperature: t of 'attention' (scores Q K^T ~ N(0, 1): t = 0.1 is nearly sparse, t = 10
            nearly uniform).
        head_dim, locality: passed to :func:`attention_inputs`.
        model, name: for 'weight': the model and the parameter name (default: its largest matrix).
        dtype: float dtype (the complex one of the same precision for 'dft').

    Returns:
        (n, n) tensor. 'sparse_lowrank' = S / ||S||_F + L / ||L||_F, both parts equally strong.

    Example:
        >>> a = target_matrix('attention', 64, temperature=0.1)
        >>> torch.allclose(a.sum(1) / a.sum(1)[0], torch.ones(64, dtype=a.dtype))
        True
    """
    if not isinstance(kind, str) or kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; known: {', '.join(TARGET_KINDS)}")
    check_int("seed", seed, 0)
    if kind == "weight":
        if n is not None:
            check_int("n", n, 1)
        return _weight(model, n, name)
    check_int("n", n, 2)
    if rank is None:
        rank = max(1, n // 16)
    check_int("rank", rank, 1)
    if rank > n:
        raise ValueError(f"rank must be <= n={n}, got {rank}")
    density = check_number("density", density, high=1.0)
    check_number("temperature", temperature)
    generator = torch.Generator().manual_seed(seed)

    if kind == "gaussian":
        a = torch.randn(n, n, generator=generator, dtype=dtype)
    elif kind == "lowrank":
        a = _lowrank(n, rank, generator, dtype)
    elif kind == "sparse":
        a = _sparse(n, density, generator, dtype)
    elif kind == "sparse_lowrank":
        s, low = _sparse(n, density, generator, dtype), _lowrank(n, rank, generator, dtype)
        a = s / torch.linalg.norm(s) + low / torch.linalg.norm(low)
    elif kind == "dft":
        a = _dft(n, torch.complex128 if dtype == torch.float64 else torch.complex64)
    elif kind == "dct":
        a = _dct(n, dtype)
    elif kind == "hadamard":
        a = _hadamard(n, dtype)
    elif kind == "circulant":  # C[i, j] = c[(i - j) mod n]
        c = torch.randn(n, generator=generator, dtype=dtype)
        idx = torch.arange(n)
        a = c[(idx[:, None] - idx[None, :]) % n]
    elif kind == "toeplitz":   # T[i, j] = t[i - j + n - 1]
        t = torch.randn(2 * n - 1, generator=generator, dtype=dtype)
        idx = torch.arange(n)
        a = t[idx[:, None] - idx[None, :] + n - 1]
    elif kind == "butterfly":
        factors = random_butterfly_factors(n, seed, dtype)
        a = torch.linalg.multi_dot(factors[::-1]) if len(factors) > 1 else factors[0]
    else:  # attention
        q, k = attention_inputs(n, head_dim, seed, locality, dtype)
        a = torch.softmax(q @ k.T / temperature, dim=-1)
    if not bool(torch.isfinite(a).all()):
        raise ValueError(f"target {kind!r} overflowed at these settings (temperature={temperature})")
    return a / torch.linalg.norm(a)


def digits_mlp(hidden: int = 64, steps: int = 300, seed: int = 0) -> torch.nn.Module:
    """A small MLP 64 -> hidden -> hidden -> 10 trained on scikit-learn's digits (no download).

    Full-batch Adam (lr 1e-2) for ``steps`` steps, float32, about a second at hidden=128 on a
    laptop CPU: enough for the (hidden, hidden) middle weight to move well away from its random
    initialisation (training accuracy near 100%), which is what a "trained weight" target needs.

    Returns:
        the trained ``nn.Sequential``; its (hidden, hidden) middle weight is parameter '2.weight':
        ``target_matrix('weight', None, model=digits_mlp(), name='2.weight')``.
    """
    from sklearn.datasets import load_digits

    check_int("hidden", hidden, 1)
    check_int("steps", steps, 0)
    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x / 16.0, dtype=torch.float32)
    y = torch.as_tensor(y)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                torch.nn.Linear(hidden, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with few_threads(x.shape[0] * hidden):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def plot_targets(kinds=("dft", "hadamard", "butterfly", "sparse_lowrank", "attention"), n: int = 32,
                 seed: int = 0, size: float = 2.6):
    """Pictures of |A| for several target kinds (default options), one panel each; returns the figure."""
    import matplotlib.pyplot as plt

    kinds = list(kinds)
    fig, axes = plt.subplots(1, len(kinds), figsize=(size * len(kinds), size + 0.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        ax.imshow(target_matrix(kind, n, seed).abs().numpy(), cmap="magma")
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("column")
        ax.set_ylabel("row")
    fig.suptitle(f"|A| of target matrices, n={n}")
    fig.tight_layout()
    return fig
