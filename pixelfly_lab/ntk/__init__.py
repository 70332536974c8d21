"""Tier 4 — ntk: the empirical neural tangent kernel of sparse models and kernel distances.

* :mod:`.empirical` — ``empirical_ntk`` (its arguments checked once) and ``seed_spread``;
* :mod:`.methods` — how the kernel is computed: the loop reference, Jacobian contraction,
  NTK-vector products, structured derivatives, assembled block by block within a memory budget;
* :mod:`.distances` — ``kernel_distance`` (relative Frobenius and scale-free metrics), ``spectra``;
* :mod:`.structured` — the structured layers' derivatives, for the contraction method.

Beside ``approx`` and ``training`` (neither imports the others); imports only ``nn`` and below.
"""
