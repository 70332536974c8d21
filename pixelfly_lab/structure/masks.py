"""Butterfly supports and the flat block butterfly layout, as boolean masks.

Pure index arithmetic: every function returns a ``torch.bool`` tensor and allocates nothing
else. The masks built from sizes are CPU tensors whatever the ambient device (``with
torch.device("meta")`` included: :func:`on_host`), so a layer built under that context plans on
the host and puts only its parameters on the ambient device. Rows r and columns c are indexed from 0; every size called ``n`` or ``butterfly_size``
is a power of two.

Definitions (Dao, Chen et al., "Pixelated Butterfly", ICLR 2022, arXiv 2112.00029, Sec. 3-4):

* butterfly factor B_k^(n), k = 2 * stride: support {(r, c): r XOR c in {0, stride}}
* butterfly product B_{2^m} ... B_2: support {(r, c): r XOR c < 2^m} (block-diagonal)
* flat butterfly I + sum_{i < n_factors} B_{2^(i+1)}:
  support {(r, c): r XOR c in {0, 1, 2, ..., 2^(n_factors-1)}}, density (1 + n_factors) / n
* block butterfly: every cell becomes a b x b block, support = kron(support, ones(b, b))

Example:
    >>> flat_butterfly_mask(4, 1).int()
    tensor([[1, 1, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 1, 1],
            [0, 0, 1, 1]], dtype=torch.int32)
"""

from __future__ import annotations

import functools

import torch

from pixelfly_lab._checks import check_int, check_power_of_two, is_power_of_two

__all__ = [
    "on_host",
    "is_power_of_two",
    "butterfly_factor_mask",
    "butterfly_product_mask",
    "flat_butterfly_mask",
    "block_butterfly_mask",
    "flat_block_butterfly_layout",
    "layout_to_mask",
    "mask_to_layout",
]


def on_host(function):
    """Decorator: run ``function`` with the CPU as the ambient device.

    Index arithmetic (masks, layouts, plans) must hold values whatever device context the caller
    is in: under ``with torch.device("meta")`` a bare ``torch.arange`` is a meta tensor with no
    values to plan from. Tensors passed in keep their own device.
    """
    @functools.wraps(function)
    def on_cpu(*args, **kwargs):
        with torch.device("cpu"):
            return function(*args, **kwargs)
    return on_cpu


def _check_n_factors(n_factors, n: int, size_name: str = "n") -> int:
    check_int("n_factors", n_factors)
    max_factors = n.bit_length() - 1
    if not 1 <= n_factors <= max_factors:
        raise ValueError(
            f"n_factors must be in 1..log2({size_name})={max_factors} for {size_name}={n}, got {n_factors}"
        )
    return n_factors


def _xor_grid(n: int) -> torch.Tensor:
    """(n, n) int64 tensor of r XOR c."""
    idx = torch.arange(n)
    return idx[:, None] ^ idx[None, :]


@on_host
def butterfly_factor_mask(n: int, stride: int) -> torch.Tensor:
    """Support of the butterfly factor matrix B_{2*stride}^(n).

    Args:
        n: matrix size, a power of two >= 2.
        stride: half the factor size k/2; a power of two in 1..n/2.

    Returns:
        bool (n, n): True where r XOR c is 0 or ``stride``. Density 2/n.
    """
    check_power_of_two("n", n, 2)
    check_power_of_two("stride", stride)
    if stride > n // 2:
        raise ValueError(f"stride must be <= n/2={n // 2}, got {stride}")
    x = _xor_grid(n)
    return (x == 0) | (x == stride)


@on_host
def butterfly_product_mask(n: int, n_factors: int | None = None) -> torch.Tensor:
    """Support of the product B_{2^m} ... B_4 B_2 of the first ``m = n_factors`` factors.

    The product connects r and c exactly when r XOR c only has bits below 2^m, i.e. r XOR c < 2^m:
    a block-diagonal matrix with dense blocks of size 2^m. With all log2(n) factors (the default)
    the support of the butterfly matrix B^(n) is dense; its values are not free: 2 n log2 n
    parameters fit the fast transforms (DFT, Hadamard, ...) exactly, not an arbitrary matrix
    (deep compositions of butterflies are needed for any sparse matrix: Dao et al., ICLR 2020).

    Returns:
        bool (n, n).
    """
    check_power_of_two("n", n, 2)
    m = n.bit_length() - 1 if n_factors is None else _check_n_factors(n_factors, n)
    return _xor_grid(n) < (1 << m)


@on_host
def flat_butterfly_mask(n: int, n_factors: int) -> torch.Tensor:
    """Support of the flat butterfly I + sum_{i < n_factors} B_{2^(i+1)}^(n).

    Args:
        n: matrix size, a power of two >= 2.
        n_factors: how many factors (strides 1, 2, ..., 2^(n_factors-1)); 1..log2(n).

    Returns:
        bool (n, n), symmetric, with exactly 1 + n_factors True entries per row and column.
    """
    check_power_of_two("n", n, 2)
    _check_n_factors(n_factors, n)
    x = _xor_grid(n)
    # r XOR c is 0 or a single bit below 2^n_factors  <=>  x & (x - 1) == 0 and x < 2^n_factors
    return ((x & (x - 1)) == 0) & (x < (1 << n_factors))


def layout_to_mask(layout: torch.Tensor, block_size: int) -> torch.Tensor:
    """Expand a block layout to an element mask: every cell becomes a block_size^2 block.

    Args:
        layout: bool (R, C).
        block_size: int >= 1.

    Returns:
        bool (R * block_size, C * block_size) = kron(layout, ones(block_size, block_size)).
    """
    if not isinstance(layout, torch.Tensor) or layout.dim() != 2:
        raise ValueError(f"layout must be a 2-D tensor, got {type(layout).__name__} "
                         f"of shape {tuple(getattr(layout, 'shape', ()))}")
    check_int("block_size", block_size)
    return layout.bool().repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


def mask_to_layout(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Coarsen an element mask to blocks: a block is kept if any element in it is.

    Args:
        mask: bool (rows, cols), both divisible by ``block_size``.

    Returns:
        bool (rows / block_size, cols / block_size).
    """
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError("mask must be a 2-D tensor")
    check_int("block_size", block_size)
    rows, cols = mask.shape
    if rows % block_size or cols % block_size:
        raise ValueError(f"mask shape {tuple(mask.shape)} is not divisible by block_size={block_size}")
    blocks = mask.bool().reshape(rows // block_size, block_size, cols // block_size, block_size)
    return blocks.any(dim=3).any(dim=1)


@on_host
def block_butterfly_mask(n: int, n_factors: int, block_size: int) -> torch.Tensor:
    """Flat block butterfly: the flat butterfly support with every cell a block_size^2 block.

    Returns:
        bool (n * block_size, n * block_size) = kron(flat_butterfly_mask(n, n_factors), ones).
    """
    return layout_to_mask(flat_butterfly_mask(n, n_factors), block_size)


@on_host
def flat_block_butterfly_layout(
    out_features: int,
    in_features: int,
    butterfly_size: int,
    n_factors: int,
    block_size: int,
    shuffle: bool = False,
    global_size: int = 0,
) -> torch.Tensor:
    """Block layout of a flat block butterfly weight of shape (out_features, in_features).

    Reproduces the released Pixelfly code's layout in five steps:

    1. S = flat butterfly support of size ``butterfly_size`` with ``n_factors`` factors;
    2. if ``shuffle``: view S's columns as (group, c) with 2^(log2(butterfly_size) - n_factors)
       groups and reorder them to (c, group);
    3. stretch every cell of S to a dense (out_features / butterfly_size) x
       (in_features / butterfly_size) rectangle;
    4. if ``global_size`` > 0: make the first ``global_size`` rows and columns dense;
    5. coarsen to (block_size x block_size) hardware blocks: keep a block if any element is kept.

    Without shuffle the layout is block-diagonal with groups of 2^n_factors cells (see
    :func:`butterfly_product_mask`), which fast kernels exploit.

    Args:
        out_features, in_features: weight shape; both divisible by ``butterfly_size`` and by
            ``block_size``.
        butterfly_size: power of two >= 2.
        n_factors: 1..log2(butterfly_size).
        block_size: hardware block edge, >= 1.
        shuffle: apply step 2.
        global_size: dense rows/columns at the start, 0..min(out_features, in_features).

    Returns:
        bool (out_features / block_size, in_features / block_size).

    Example:
        >>> flat_block_butterfly_layout(1024, 4096, 16, 2, 32).shape
        torch.Size([32, 128])
    """
    check_int("out_features", out_features)
    check_int("in_features", in_features)
    check_power_of_two("butterfly_size", butterfly_size, 2)
    _check_n_factors(n_factors, butterfly_size, "butterfly_size")
    check_int("block_size", block_size)
    check_int("global_size", global_size, 0)
    for name, size in (("out_features", out_features), ("in_features", in_features)):
        if size % butterfly_size:
            raise ValueError(f"{name}={size} is not divisible by butterfly_size={butterfly_size}")
        if size % block_size:
            raise ValueError(f"{name}={size} is not divisible by block_size={block_size}")
    if global_size > min(out_features, in_features):
        raise ValueError(
            f"global_size must be <= min(out_features, in_features)={min(out_features, in_features)}, "
            f"got {global_size}"
        )

    support = flat_butterfly_mask(butterfly_size, n_factors)                       # step 1
    if shuffle:                                                                     # step 2
        groups = butterfly_size >> n_factors
        support = (support.reshape(butterfly_size, groups, 1 << n_factors)
                   .transpose(1, 2).reshape(butterfly_size, butterfly_size))
    # Steps 3 and 5 without materialising the (out, in) element mask: block row I covers the
    # cell rows its elements fall in, so it is kept at (I, J) iff some covered cell pair is in S.
    rows = _cells_covered(out_features, butterfly_size, block_size)                # (R, size)
    cols = _cells_covered(in_features, butterfly_size, block_size)                 # (C, size)
    layout = (rows.double() @ support.double() @ cols.double().T) > 0             # steps 3 + 5
    if global_size:                                                                # step 4 (+5)
        layout[: -(-global_size // block_size), :] = True
        layout[:, : -(-global_size // block_size)] = True
    return layout


def _cells_covered(features: int, butterfly_size: int, block_size: int) -> torch.Tensor:
    """bool (features / block_size, butterfly_size): which stretched cells each block overlaps."""
    cell = features // butterfly_size
    start = torch.arange(0, features, block_size)
    first, last = start // cell, (start + block_size - 1) // cell
    index = torch.arange(butterfly_size)
    return (index[None, :] >= first[:, None]) & (index[None, :] <= last[:, None])
