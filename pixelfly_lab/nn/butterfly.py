"""Butterfly matrices as a layer: products of butterfly factors with learnable twiddles.

Definitions (Dao et al., "Learning Fast Algorithms for Linear Transforms Using Butterfly
Factorizations", ICML 2019, arXiv 1903.05895; Dao, Chen et al., "Pixelated Butterfly",
ICLR 2022, arXiv 2112.00029, Sec. 3):

* the butterfly factor B_k^(n) of stride s = k/2 mixes each pair (r, r + s), r with bit s
  clear, by its own 2x2 "twiddle" [[a, b], [c, d]]:
  (B x)[r] = a x[r] + b x[r+s],  (B x)[r+s] = c x[r] + d x[r+s]; its support is
  {(r, c): r XOR c in {0, s}} (:func:`pixelfly_lab.structure.masks.butterfly_factor_mask`);
* the butterfly matrix B^(n) = B_n B_{n/2} ... B_2 (stride 1 applied first), optionally after
  an input permutation P: W = B_n ... B_2 P;
* the residual form prod_i (I + lam B_{2^i}), whose first-order term is the flat butterfly
  I + lam sum_i B_{2^i}; the gap between the two is O(lam^2) (Pixelfly, Sec. 3.2).

Exact transforms (HazyResearch/butterfly's ``special.py`` idea, derived here from the
Cooley-Tukey recursion): the Sylvester Hadamard matrix is every factor with twiddle
[[1, 1], [1, -1]]; the DFT F[r, c] = exp(-2 pi i r c / n) is the bit-reversal permutation
followed by factors of stride s with twiddles [[1, w^j], [1, -w^j]], w = exp(-2 pi i / (2s)),
j = r mod s (decimation in time).

Example:
    >>> h = ButterflyLinear.from_transform('hadamard', 4)
    >>> h.dense_weight()
    tensor([[ 1.,  1.,  1.,  1.],
            [ 1., -1.,  1., -1.],
            [ 1.,  1., -1., -1.],
            [ 1., -1., -1.,  1.]], grad_fn=<MmBackward0>)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pixelfly_lab._checks import check_power_of_two
from pixelfly_lab.nn.base import StructuredLinear, ambient_device, scale_factors_

__all__ = ["ButterflyLinear", "bit_reversal_permutation"]


def bit_reversal_permutation(n: int) -> torch.Tensor:
    """Long (n,): r -> r with its log2(n) bits reversed (an involution)."""
    check_power_of_two("n", n)
    bits = n.bit_length() - 1
    r = torch.arange(n)
    out = torch.zeros_like(r)
    for i in range(bits):
        out |= ((r >> i) & 1) << (bits - 1 - i)
    return out


class ButterflyLinear(StructuredLinear):
    """y = x W^T (+ bias), W = F_{m-1} ... F_1 F_0 P with F_f the butterfly factor of stride 2^f.

    Args:
        n: size (in_features = out_features = n), a power of two >= 2.
        n_factors: how many factors m (strides 1, 2, ..., 2^(m-1)); default log2(n), the full
            butterfly B^(n), which can be dense.
        complex: complex twiddles (output complex); stored as real tensors with a trailing
            (real, imag) axis so that ``.to(dtype)`` keeps them complex.
        residual: F_f = I + lam * B_f instead of B_f.
        lam: the residual scale (a fixed float, not learned).
        bias: learn a (real) bias; off by default because butterflies are usually transforms.

    Attributes:
        twiddle: Parameter (m, n/2, 2, 2) [+ (2,) if complex]: twiddle[f, p] is the 2x2 matrix of
            pair p of factor f, pairs ordered by their first row r (bit 2^f of r clear).
        perm: long buffer (n,): the input permutation, (P x)[r] = x[perm[r]] (identity by default).

    Init: twiddle entries ~ N(0, 1/2) (complex: each part N(0, 1/4)), so every factor, and the
    product, preserves the expected squared norm of its input. Residual: N(0, 1/2) too, scaled
    by ``lam`` in the forward.
    """

    def __init__(self, n: int, n_factors: int | None = None, *, complex: bool = False,
                 residual: bool = False, lam: float = 1.0, bias: bool = False, device=None, dtype=None):
        super().__init__(n, n)
        check_power_of_two("n", n, 2)
        max_factors = n.bit_length() - 1
        self.n = n
        self.n_factors = max_factors if n_factors is None else n_factors
        if not 1 <= self.n_factors <= max_factors:
            raise ValueError(f"n_factors must be in 1..log2(n)={max_factors}, got {n_factors}")
        self.complex, self.residual, self.lam = bool(complex), bool(residual), float(lam)
        factory = {"device": device, "dtype": dtype}
        shape = (self.n_factors, n // 2, 2, 2) + ((2,) if self.complex else ())
        self.twiddle = nn.Parameter(torch.empty(shape, **factory))
        self.register_buffer("perm", torch.empty(n, dtype=torch.long, device=ambient_device(device)))
        self._make_bias(bias, factory)
        self.reset_parameters()

    def _reset_weight(self) -> None:
        """Re-draw the twiddles (see Init) and restore the identity permutation.

        (Also what makes a layer built on the meta device usable after ``to_empty``.)
        """
        std = math.sqrt(0.25 if self.complex else 0.5)
        t = self.twiddle
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, dtype=t.dtype, device=t.device) * std)
            self.perm.copy_(torch.arange(self.n, device=self.perm.device))

    def _scale_weight(self, c: float) -> None:
        """W = F_{m-1} ... F_0 P: each factor's twiddles times c^(1/m) (c = 0: the first factor zero)."""
        if self.residual:
            raise ValueError("a residual butterfly prod (I + lam B_f) cannot be rescaled factor by factor")
        scale_factors_(list(self.twiddle), c)

    @classmethod
    def from_transform(cls, kind: str, n: int, device=None, dtype=None) -> "ButterflyLinear":
        """The butterfly whose dense_weight() is a known transform exactly.

        Args:
            kind: 'hadamard' (Sylvester, H[r, c] = (-1)^popcount(r & c), real) or 'dft'
                (unnormalised, F[r, c] = exp(-2 pi i r c / n), complex, bit-reversed input).
            n: size, a power of two >= 2.
        """
        if kind not in ("hadamard", "dft"):
            raise ValueError(f"kind must be 'hadamard' or 'dft', got {kind!r}")
        layer = cls(n, complex=kind == "dft", device=device, dtype=dtype)
        with torch.no_grad():
            if kind == "hadamard":
                layer.twiddle.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]).expand_as(layer.twiddle))
                return layer
            twiddle = torch.empty(layer.n_factors, n // 2, 2, 2, dtype=torch.complex128)
            for f in range(layer.n_factors):
                s = 1 << f
                w = torch.exp(-2j * math.pi * torch.arange(s, dtype=torch.float64) / (2 * s))
                w = w.repeat(n // (2 * s))          # pair p = block * s + j has twiddle power j
                twiddle[f] = torch.stack([torch.stack([torch.ones_like(w), w], -1),
                                          torch.stack([torch.ones_like(w), -w], -1)], -2)
            layer.twiddle.copy_(torch.view_as_real(twiddle))
            layer.perm.copy_(bit_reversal_permutation(n))
        return layer

    def _twiddles(self) -> torch.Tensor:
        """(m, n/2, 2, 2), complex when the layer is."""
        return torch.view_as_complex(self.twiddle) if self.complex else self.twiddle

    def _forward(self, x):
        twiddle = self._twiddles()
        if self.complex:
            x = x.to(twiddle.dtype)
        batch, n = x.shape[:-1], self.n
        x = x[..., self.perm]
        for f in range(self.n_factors):
            s = 1 << f
            pairs = x.reshape(*batch, n // (2 * s), 2, s)              # r = block*2s + half*s + j
            t = twiddle[f].reshape(n // (2 * s), s, 2, 2)               # [block, j, out, in]
            mixed = torch.einsum("...bij,bjoi->...boj", pairs, t)
            x = (pairs + self.lam * mixed if self.residual else mixed).reshape(*batch, n)
        return x if self.bias is None else x + self.bias

    def factor_matrices(self) -> list[torch.Tensor]:
        """The dense (n, n) butterfly factors B_f (without I + lam), in the order applied."""
        twiddle, n = self._twiddles(), self.n
        factors = []
        for f in range(self.n_factors):
            s = 1 << f
            first = torch.arange(n, device=twiddle.device)
            first = first[(first & s) == 0]                              # pair p's first row r
            rows = torch.stack([first, first + s])                       # (2, n/2): out index o
            m = twiddle.new_zeros(n, n)
            for o in range(2):
                for i in range(2):
                    m = m.index_put((rows[o], rows[i]), twiddle[f][:, o, i])
            factors.append(m)
        return factors

    def permutation_matrix(self) -> torch.Tensor:
        """P (n, n) with (P x)[r] = x[perm[r]]."""
        return torch.eye(self.n, dtype=self._twiddles().dtype, device=self.perm.device)[self.perm]

    def dense_weight(self):
        """W = F_{m-1} ... F_0 P, F_f = B_f (or I + lam B_f when residual)."""
        weight = self.permutation_matrix()
        eye = torch.eye(self.n, dtype=weight.dtype, device=weight.device)
        for factor in self.factor_matrices():
            weight = ((eye + self.lam * factor) if self.residual else factor) @ weight
        return weight

    def flat_dense_weight(self) -> torch.Tensor:
        """The first-order (flat butterfly) term (I + lam sum_f B_f) P of the residual product.

        Its support is the flat butterfly mask with n_factors factors; the gap
        ||dense_weight() - flat_dense_weight()|| is O(lam^2) for a residual layer.
        """
        perm = self.permutation_matrix()
        return perm + self.lam * torch.stack(self.factor_matrices()).sum(0) @ perm

    @property
    def weight_params(self):
        return self.twiddle.numel()

    def extra_repr(self):
        return (f"n={self.n}, n_factors={self.n_factors}, complex={self.complex}, "
                f"residual={self.residual}" + (f", lam={self.lam}" if self.residual else "")
                + f", bias={self.bias is not None}")
