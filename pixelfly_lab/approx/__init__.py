"""Tier 4 — approx: expressiveness, how well a pattern at a budget approximates a matrix.

* :mod:`.targets` — target matrices (Fourier, DCT, Hadamard, low-rank, sparse, attention, trained);
* :mod:`.approximation` — ``approximate``: the best approximation by each pattern, split search;
* :mod:`.expressiveness` — ``expressiveness_table`` and its plot.

Beside ``ntk`` and ``training`` (neither imports the others); imports only ``nn`` and below.
"""
