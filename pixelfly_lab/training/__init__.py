"""Tier 4 — training: data, small models, the training loop and the rank of weights.

* :mod:`.data` — ``load_data``: the data sets by name (no downloads);
* :mod:`.tasks` — ``TaskData``, what every loader returns;
* :mod:`.generated` — MNIST-1D, ListOps, teacher-student regression;
* :mod:`.readers` — digits (scikit-learn), the shipped character corpus, a local CIFAR-10;
* :mod:`.models` — MLP, MLP-Mixer, ViT, GPT with sparse layers where asked;
* :mod:`.config` — ``TrainConfig`` (one commented dataclass), ``TrainResult``, the ``lr_at`` schedule;
* :mod:`.loop` — ``train``: the loop, its evaluation and summary;
* :mod:`.checkpoints` — checkpoints and output files, written atomically;
* :mod:`.distributed` — torchrun's process group, sums over ranks, parameter fingerprints;
* :mod:`.command` — the ``train`` command (``python -m pixelfly_lab train``);
* :mod:`.rank` — singular-value spectra of trained weights.

Beside ``approx`` and ``ntk`` (neither imports the others); imports only ``nn`` and below.
"""
