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
   oracle or sanity check that holds whenever the code is right; ``'target'`` is one of the
   toolkit's own speed targets (own report section, never a failed check); ``'info'`` has no
   verdict. A comparison is decided by :mod:`pixelfly_lab.studies.stats` (``paired_decision``:
   a t interval of the mean paired difference, held / refuted / undecided); a family of comparisons
   (several layers or metrics) goes through :func:`~pixelfly_lab.studies.claims.family_claim` (Holm,
   or one headline member declared in advance with the others as readings; the seeds that would
   decide each undecided member, computed once; the Claim's fields). The Claim carries effect,
   interval, seeds and the seeds that would decide it. A
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

# Study helpers the notebooks use, as ``import pixelfly_lab.studies as studies; studies.ntk_study(...)``.
# Loaded on first use (PEP 562), so importing one study does not import the others.
import importlib

_NOTEBOOK_EXPORTS = {
    "pixelfly_lab.studies.theorems": ("residual_flat_gap", "loglog_slope", "plot_residual_flat_gap",
                                      "lowrank_share_sweep", "plot_lowrank_share_sweep", "exact_butterflies",
                                      "plot_exact_butterflies", "block_vs_butterfly", "plot_block_vs_butterfly"),
    "pixelfly_lab.studies.estimators": ("attention_table", "plot_attention_table", "plot_attention_examples",
                                       "ATTENTION_ESTIMATORS", "ATTENTION_ORACLES", "attention_kinds",
                                       "layer_error_table"),
    "pixelfly_lab.studies.ntk_comparison": ("method_table", "ntk_study", "plot_distance_at_init",
                                            "plot_distance_vs_accuracy", "plot_kernel", "plot_spectra"),
    "pixelfly_lab.studies.stats": ("spearman_permutation_test",),
    "pixelfly_lab.studies.training_comparison": ("compare_patterns", "plot_curves", "plot_parity", "plot_ranks",
                                                 "plot_step_times", "step_speed"),
    "pixelfly_lab.studies.reproduce": ("reproduce", "load_results"),
    "pixelfly_lab.studies.verdicts": ("claims_table", "study_figures", "show_study"),
}
_EXPORT_MODULE = {name: module for module, names in _NOTEBOOK_EXPORTS.items() for name in names}
__all__ = sorted(_EXPORT_MODULE) + ["NTK_QUICK"]


def __getattr__(name):
    if name == "NTK_QUICK":  # the NTK comparison's quick config (a frozen dataclass; `replace` it to shrink)
        return importlib.import_module("pixelfly_lab.studies.ntk_comparison").QUICK
    if name in _EXPORT_MODULE:
        return getattr(importlib.import_module(_EXPORT_MODULE[name]), name)
    raise AttributeError(f"module 'pixelfly_lab.studies' has no attribute {name!r}")
