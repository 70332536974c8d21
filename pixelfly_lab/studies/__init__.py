"""The studies: the paper's experiments, composed from the library into figures, tables and claims.

Two layers. The *library* (every module of ``pixelfly_lab`` outside this folder) is what a user
calls: masks, patterns, layers, ``approximate``, ``empirical_ntk``, ``train``, the bench's
measuring functions, plot helpers. The *studies* (this folder) reproduce the Pixelfly paper
(Dao, Chen et al., ICLR 2022, arXiv 2112.00029): each one runs library functions at chosen sizes,
saves figures and tables, and returns :class:`~pixelfly_lab.studies.claims.Claim`\\ s.

The rule: dependencies point one way. Nothing outside ``studies/`` imports ``studies/`` (or its
``claims``); a study may import anything from the library. A helper two studies need, or a
user would call, belongs in the library.

Adding a study ``NAME`` (one module, ``studies/NAME.py``):

1. a frozen config dataclass holding every size the study depends on, and three instances:
   ``FULL`` (the paper-scale run a user starts deliberately), ``QUICK`` (what ``make reproduce``
   runs: CPU minutes, the whole quick run stays near ten minutes on 2 cores) and ``TINY``
   (seconds: ``make test`` runs every study at TINY);
2. ``run(out: Path, config, *, device: str) -> list[Claim]``: writes figures with
   :func:`~pixelfly_lab.studies.claims.save_figure` and tables with
   :func:`~pixelfly_lab.studies.claims.save_table` into ``out`` and returns its claims. A claim
   of kind ``'paper'`` names its source in the paper (section, figure, table, theorem) or the
   talk and states its condition and threshold in its text ("held when ..."); ``'check'`` is an
   oracle or sanity check that holds whenever the code is right; ``'info'`` has no verdict. A
   paper claim this run cannot decide has ``held=None`` and says why: "undecided ..." in its
   text (e.g. a spread over one seed) or a measurement starting "not measured: ..." (a GPU claim
   on the CPU);
3. an :class:`~pixelfly_lab.studies.reproduce.Experiment` entry (name, module, title) in
   :data:`~pixelfly_lab.studies.reproduce.EXPERIMENTS`, in report order.

``tests/test_reproduce.py`` then runs the new study at TINY through the same driver as
``python -m pixelfly_lab reproduce`` and checks its claims, figures and tables; nothing else
needs registering.

Run them: ``python -m pixelfly_lab reproduce --preset quick --only NAME`` (``--preset tiny``,
``quick`` or ``full``; ``--quick`` is an alias of ``--preset quick``).
"""
