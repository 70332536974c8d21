"""Tier 4 — training: data, small models, the training loop and the rank of weights.

* :mod:`.data` — data sets generated or shipped (no downloads);
* :mod:`.models` — MLP, MLP-Mixer, ViT, GPT with sparse layers where asked;
* :mod:`.loop` — ``train`` and ``TrainConfig`` (the ``train`` command), DDP included;
* :mod:`.rank` — singular-value spectra of trained weights.

Beside ``approx`` and ``ntk`` (neither imports the others); imports only ``nn`` and below.
"""
