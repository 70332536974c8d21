"""Tier 4 — approx: expressiveness, how well a pattern at a budget approximates a matrix.

* :mod:`.targets` — target matrices (Fourier, DCT, Hadamard, low-rank, sparse, attention, trained);
* :mod:`.expressiveness` — ``approximate`` and ``expressiveness_table``.

Beside ``ntk`` and ``training`` (neither imports the others); imports only ``nn`` and below.
"""
