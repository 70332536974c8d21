"""Tier 3 — nn: modules built on the ops, each with ``dense_weight()`` as its oracle.

* :mod:`.base` — ``StructuredLinear``: what every layer owns (``project_``, ``rescale_``, ``match_``, init memory);
* :mod:`.sparse`, :mod:`.lowrank`, :mod:`.monarch` — ``MaskedLinear``/``BlockSparseLinear``, ``LowRankLinear``, ``MonarchLinear``;
* :mod:`.layers` — every layer in one place, ``SparseLowRankLinear``/``PixelflyLinear``, ``layer_from_pattern``;
* :mod:`.butterfly` — ``ButterflyLinear`` (a product of butterfly factors);
* :mod:`.random_features` — Performer's positive random features;
* :mod:`.attention` — ``PixelflyAttention`` (block-sparse scores + low-rank features);
* :mod:`.linear_like` — which modules are linear layers, shared weights, fused fast paths;
* :mod:`.sparsification` — ``sparsify``: swap a model's linear layers for structured ones;
* :mod:`.materialize` — ``materialize``: a model built on the meta device, allocated and initialised.

Imports only tiers below (``ops``, ``structure``, ``_checks``, utilities).
"""
