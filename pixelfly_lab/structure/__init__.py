"""Tier 1 — structure: which entries a sparse matrix keeps, as pure index arithmetic.

Masks and layouts are CPU bool tensors built from integer arithmetic, whatever the ambient
device (``with torch.device("meta")`` included), so every tier above can plan with them.

* :mod:`.masks` — butterfly factor supports, flat and block butterflies, the released flat block
  butterfly layout (Dao, Chen et al., ICLR 2022, arXiv 2112.00029, section 3);
* :mod:`.patterns` — every named pattern at a parameter budget and the Pixelfly planner;
* :mod:`.projections` — best fits of a matrix on a support (sparse, low-rank, sparse + low-rank, Monarch);
* :mod:`.pictures` — pixel pictures of layouts and density tables.

Imports only :mod:`pixelfly_lab._checks` and the small utilities beside it.
"""
