"""Tier 3 — nn: modules built on the ops, each with ``dense_weight()`` as its oracle.

* :mod:`.layers` — ``MaskedLinear``, ``BlockSparseLinear``, ``LowRankLinear``, ``PixelflyLinear``, ``MonarchLinear``;
* :mod:`.butterfly` — ``ButterflyLinear`` (a product of butterfly factors);
* :mod:`.random_features` — Performer's positive random features;
* :mod:`.attention` — ``PixelflyAttention`` (block-sparse scores + low-rank features);
* :mod:`.sparsification` — ``sparsify``: swap a model's linear layers for structured ones.

Imports only tiers below (``ops``, ``structure``, ``_checks``, utilities).
"""
