"""Tier 4 — ntk: the empirical neural tangent kernel of sparse models and kernel distances.

* :mod:`.empirical` — ``empirical_ntk``, ``kernel_distance``, ``seed_spread``, ``spectra``;
* :mod:`.structured` — the structured layers' derivatives, for the contraction method.

Beside ``approx`` and ``training`` (neither imports the others); imports only ``nn`` and below.
"""
