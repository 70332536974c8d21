"""Tier 5 — speed: timing steps and layers against dense, with the machine's own dense rate.

* :mod:`.bench` — the ``bench`` command and its figure, over :mod:`.layer_speed` (layer tables),
  :mod:`.model_speed` (whole-model steps) and :mod:`.machine` (CPU, flags, load);
* :mod:`.attention` — attention speed and memory against SDPA.

Imports the tiers below it; never the studies.
"""
