"""Tier 5 — speed: timing steps and layers against dense, with the machine's own dense rate.

* :mod:`.bench` — layer and model speed tables (the ``bench`` command);
* :mod:`.attention` — attention speed and memory against SDPA.

Imports the tiers below it; never the studies.
"""
