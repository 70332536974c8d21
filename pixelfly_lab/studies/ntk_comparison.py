"""The NTK study: how close each sparsity pattern's neural tangent kernel is to the dense model's.

The Pixelfly paper (Dao, Chen et al., ICLR 2022, arXiv 2112.00029, Sec. 3.3) chooses its fixed
pattern by the neural tangent kernel: a sparse network whose NTK is close to the dense network's
should train like it; among patterns at the same budget the flat block butterfly + low-rank one
(Pixelfly) is the closest, and the NTK distance ranks the patterns' accuracies.

Here, for each model family (MLP, small MLP-Mixer on the MNIST-1D-style task of
:func:`pixelfly_lab.training.data.make_mnist1d`), each pattern at the same budget and several seeds, the
empirical NTK at initialisation (:func:`pixelfly_lab.ntk.empirical_ntk`, on held-out examples)
is compared with the kernels of dense models of other seeds (the references), by

* ``relative_frobenius_centered``  ||C/tr C - C_r/tr C_r||_F / ||C_r/tr C_r||_F with C = H K H,
  H = I - 1 1^T / N the centring matrix (the headline: invariant to the kernel's scale and to a
  constant added to it),
* ``cka``                   1 - centred kernel alignment (invariant to scale; Kornblith et al. 2019),
* ``relative_frobenius_normalized``  the same as the first without centring: at initialisation
  the kernel's constant (mean) part is a large share of ||K||_F (``constant_share``), which this
  distance then mostly measures (kept as a reading, beside that share and ``top_share``, the
  largest eigenvalue's share of the trace),
* ``relative_frobenius``    ||K - K_r||_F / ||K_r||_F, which mixes shape with size: a kernel half
  as large as dense's is at distance >= 0.5 whatever its shape, so this one is read beside the
  ``trace_ratio`` tr K / tr K_r,

each averaged over the references. The yardstick is the dense seed-to-seed spread: the same
distances between pairs of reference kernels (:func:`pixelfly_lab.ntk.empirical.seed_spread`: mean and
standard deviation over pairs, both orders for the asymmetric Frobenius distances).
Every model is then trained (:func:`pixelfly_lab.training.loop.train`, a fixed epoch budget, on data
generated with one fixed seed: the seeds vary the initialisation only) and its test accuracy on
``n_test`` held-out examples recorded, for the distance-accuracy correlation; dense's test accuracy at
every evaluation (each epoch's end) is kept, and dense is trained again for twice the epochs, to check
that the budget lets it converge.

:mod:`pixelfly_lab.studies.ntk` composes this into the ``reproduce`` study 'ntk' (figures and claims).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import pandas as pd
import torch

from pixelfly_lab.training.data import load_data
from pixelfly_lab.training.models import build_model, count_params
from pixelfly_lab.ntk.empirical import empirical_ntk, kernel_distance, seed_spread, spectra
from pixelfly_lab.studies.training_comparison import compare_patterns, pattern_options
from tqdm.auto import tqdm
import time

__all__ = ["STUDY_PATTERNS", "STUDY_METRICS", "SCALE_FREE_METRICS", "NTKStudyConfig", "QUICK",
           "kernel_distances", "ntk_study", "method_table", "plot_kernel", "plot_distance_at_init",
           "plot_distance_vs_accuracy", "plot_spectra"]

STUDY_PATTERNS = ("dense", "lowrank", "random", "local", "bigbird", "butterfly", "monarch", "pixelfly",
                  "pixelfly-gated")
# the headline distances ignore the kernel's scale and its constant part; the uncentred ones are kept
# as readings (the trace-normalised one beside the top eigenvalue's share, the raw one beside the trace)
SCALE_FREE_METRICS = ("relative_frobenius_centered", "cka")  # alignment is close to CKA here
STUDY_METRICS = SCALE_FREE_METRICS + ("relative_frobenius_normalized", "relative_frobenius")


@dataclass(frozen=True)
class NTKStudyConfig:
    """What :func:`ntk_study` runs. The defaults are the full CPU run (tens of minutes)."""

    families: tuple = ("mlp", "mixer")
    patterns: tuple = STUDY_PATTERNS
    seeds: tuple = (0, 1, 2)
    # dense models whose kernels are the references; seeds apart from ``seeds``; at least 3 so that
    # the seed-to-seed spread has a standard deviation (over 3 pairs, 6 for the asymmetric distances)
    reference_seeds: tuple = (100, 101, 102)
    data: str = "mnist1d"           # patterns differ there (on digits every pattern reaches ~97%)
    budget: float = 0.25            # the training lab's budget
    # 8, not the training lab's 16: at 16 the Mixer's 64x256 channel MLPs have a 4x16 block grid
    # on which local, butterfly and pixelfly are the same layout (and pixelfly has no rank left)
    block_size: int = 8
    size: str = "tiny"              # models.SIZES preset: MLP width 256, Mixer dim 64
    # the MLP's depth: 4 hidden layers, the three 256x256 ones sparsified (94% of the parameters; at
    # the preset's depth 2 one layer was, and the patterns were hard to tell apart)
    mlp_depth: int = 4
    n_kernel: int = 128             # held-out examples the kernels are computed on
    # training for the distance-accuracy correlation: an epoch budget at which dense has converged
    # (its test accuracy flat over the last epochs: see the study's 'dense converged' reading)
    n_train: int | None = None      # None: the whole training split (4000 examples)
    # test examples for the accuracies: 10000 puts the sampling sd of an accuracy near 50% at
    # 0.5 points (1000 gave 1.6, as large as the differences between patterns); generated, so free
    n_test: int = 10_000
    data_seed: int = 0              # the data's seed, fixed: the seeds vary the initialisation only
    epochs: int = 30
    # how many of ``seeds`` (the first ones) are trained, for the accuracies; None: all. The kernels need many
    # seeds (paired differences of distances); the correlation's points are pattern means, which need fewer
    train_seeds: int | None = None
    batch_size: int = 64
    lr: float = 3e-3                # the training lab's learning rate for the tiny presets
    device: str = "cpu"


# The MLP only, kernels on 64 examples, 1000 training examples, seven patterns (bigbird and Monarch in
# FULL): at depth 4 the nine patterns took 4.5 minutes on a loaded 2-core machine (load ~5-7)
QUICK = NTKStudyConfig(families=("mlp",), patterns=tuple(p for p in STUDY_PATTERNS if p not in ("bigbird", "monarch")),
                       n_kernel=64, n_train=1000, epochs=15)


def kernel_distances(kernel: torch.Tensor, reference: torch.Tensor) -> dict:
    """The study's distances of ``kernel`` to ``reference``: {metric: float} for :data:`STUDY_METRICS`.

    Example:
        >>> k = torch.eye(4, dtype=torch.float64) + 0.1
        >>> d = kernel_distances(3 * k + 1, k)
        >>> round(d["relative_frobenius_centered"], 9), round(d["cka"], 9)
        (0.0, 0.0)
    """
    return {metric: kernel_distance(kernel, reference, metric) for metric in STUDY_METRICS}


def _check_config(cfg: NTKStudyConfig) -> None:
    unknown = set(cfg.patterns) - set(STUDY_PATTERNS)
    if unknown:
        raise ValueError(f"patterns {sorted(unknown)} are not studied here; choose from {STUDY_PATTERNS}")
    if len(cfg.reference_seeds) < 2:
        raise ValueError(f"reference_seeds needs at least 2 seeds for a seed-to-seed spread, got {cfg.reference_seeds}")
    if set(cfg.reference_seeds) & set(cfg.seeds):
        raise ValueError(f"reference_seeds {cfg.reference_seeds} must differ from seeds {cfg.seeds}: a dense model "
                         "of a reference's own seed is at distance 0")
    if cfg.train_seeds is not None and (isinstance(cfg.train_seeds, bool) or not isinstance(cfg.train_seeds, int)
                                        or not 1 <= cfg.train_seeds <= len(cfg.seeds)):
        raise ValueError(f"train_seeds must be None or an int in [1, {len(cfg.seeds)}] (len(seeds)), "
                         f"got {cfg.train_seeds!r}")
    if cfg.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {cfg.epochs}")
    if cfg.n_test < cfg.n_kernel:
        raise ValueError(f"n_test ({cfg.n_test}) must be at least n_kernel ({cfg.n_kernel}): the probe is test data")


def _trained_seeds(cfg: NTKStudyConfig) -> tuple:
    """The seeds trained for the accuracies: the first ``train_seeds`` of ``seeds`` (all when None)."""
    return tuple(cfg.seeds) if cfg.train_seeds is None else tuple(cfg.seeds)[:cfg.train_seeds]


def _data_options(cfg: NTKStudyConfig) -> dict:
    """The data's fixed seed; for generated sets n_train training and n_test test examples (the probe among them)."""
    if cfg.data not in ("mnist1d", "listops", "teacher"):
        return {"seed": cfg.data_seed}
    sizes = {"n_test": cfg.n_test} if cfg.n_train is None else {"n_train": cfg.n_train, "n_test": cfg.n_test}
    return {"seed": cfg.data_seed, **sizes}


def _model_options(family: str, cfg: NTKStudyConfig) -> dict:
    return {"depth": cfg.mlp_depth} if family == "mlp" else {}


def _model(family: str, label: str, seed: int, data, cfg: NTKStudyConfig):
    pattern, options = pattern_options(label)
    return build_model(family, data, size=cfg.size, pattern=pattern, budget=cfg.budget, block_size=cfg.block_size,
                       seed=seed, **options, **_model_options(family, cfg)).to(cfg.device)


def ntk_study(config: NTKStudyConfig | None = None, *, progress: bool = True, **overrides) -> pd.DataFrame:
    """Distances of each pattern's NTK at initialisation to dense kernels, and accuracy after training.

    Args:
        config: an :class:`NTKStudyConfig` (default: the full run; :data:`QUICK` for about a minute).
        progress: show a progress bar over models.
        **overrides: fields of the config to replace, e.g. ``seeds=(0,)``.

    Returns:
        DataFrame, one row per (family, pattern, seed): params, density, kernel_trace, trace_ratio
        (tr K / mean tr K_ref), top_share (largest eigenvalue / tr K), constant_share
        (|mean K| N / ||K||_F: the constant part's share of the norm), the mean distance to the reference kernels for each of
        :data:`STUDY_METRICS`, and test_accuracy, test_loss after ``epochs`` of training (NaN for a seed
        beyond ``train_seeds``: not trained).
        ``frame.attrs['spread']``: the dense seed-to-seed spread (family, metric, mean, sd, pairs);
        ``frame.attrs['history']``: the training histories (family, pattern, seed, event, step,
        epoch, train_loss, test_accuracy, ...); ``frame.attrs['spectra']``: the eigenvalue spectra
        at initialisation (family, pattern, seed, index, eigenvalue, normalized);
        ``frame.attrs['convergence']``: dense's learning curves, its test accuracy at every evaluation of
        the run of ``epochs`` and of a run of twice as many (family, run_epochs, seed, epoch: epochs
        completed, test_accuracy); ``frame.attrs['config']``: the config used.

    Example:
        >>> frame = ntk_study(QUICK, patterns=("dense", "lowrank", "pixelfly"))   # doctest: +SKIP
        >>> frame.groupby("pattern").relative_frobenius_normalized.mean()                  # doctest: +SKIP
    """

    cfg = replace(config or NTKStudyConfig(), **overrides)
    _check_config(cfg)
    probe_data = load_data(cfg.data, **_data_options(cfg))
    probe = probe_data.x_test[:cfg.n_kernel].to(cfg.device)
    jobs = [(f, p, s) for f in cfg.families for p in cfg.patterns for s in cfg.seeds]
    bar = tqdm(total=len(cfg.families) * len(cfg.reference_seeds) + 2 * len(jobs), desc="NTK study", unit="model",
               disable=not progress)
    rows, spreads, spectrum_frames, histories, convergence = [], [], [], [], []
    for family in cfg.families:
        references = []
        for seed in cfg.reference_seeds:
            references.append(empirical_ntk(_model(family, "dense", seed, probe_data, cfg), probe,
                                            progress=False).cpu())
            bar.update()
        spread = seed_spread(lambda seed: _model(family, "dense", seed, probe_data, cfg), probe,  # noqa: B023
                             seeds=cfg.reference_seeds, metrics=STUDY_METRICS)
        spreads.append(spread.assign(family=family)[["family", "metric", "mean", "sd", "pairs"]])
        ref_trace = sum(float(r.double().trace()) for r in references) / len(references)
        for fam, label, seed in (j for j in jobs if j[0] == family):
            model = _model(family, label, seed, probe_data, cfg)
            kernel = empirical_ntk(model, probe, progress=False).cpu()
            distances = pd.DataFrame([kernel_distances(kernel, r) for r in references]).mean()
            trace = float(kernel.double().trace())
            top = float(torch.linalg.eigvalsh(kernel.double())[-1])
            # ||mean(K) 1 1^T||_F / ||K||_F: how much of the kernel's norm is its constant part
            constant = float(kernel.double().mean().abs() * len(kernel) / torch.linalg.matrix_norm(kernel.double()))
            rows.append(dict(family=family, pattern=label, seed=seed, params=count_params(model),
                             density=count_params(model) / model.dense_params, kernel_trace=trace,
                             trace_ratio=trace / ref_trace, top_share=top / trace, constant_share=constant,
                             **distances.to_dict()))
            spectrum_frames.append(spectra(kernel).drop(columns="name").assign(family=family, pattern=label, seed=seed))
            bar.update()
        # trained exactly as built above: train() builds the same model from the same seed and options
        train = dict(model=family, data=cfg.data, size=cfg.size, budget=cfg.budget, block_size=cfg.block_size,
                     batch_size=cfg.batch_size, lr=cfg.lr, data_options=_data_options(cfg), device=cfg.device,
                     model_options=_model_options(family, cfg), track_rank=False, progress=False)
        runs = compare_patterns(cfg.patterns, _trained_seeds(cfg), epochs=cfg.epochs, **train)
        bar.update(len(cfg.patterns) * len(cfg.seeds))
        # dense's learning curves for the convergence gate (test accuracy at each evaluation: every epoch's end;
        # epoch = epochs completed, the history's epoch counts from 0): the run above, and dense again for twice
        # the epochs (its own cosine schedule: a curve that flattens only because the learning rate decays
        # flattens at E but still gains by 2E)
        longer = compare_patterns(("dense",), _trained_seeds(cfg), epochs=2 * cfg.epochs, **train).history
        for run_epochs, history in ((cfg.epochs, runs.history), (2 * cfg.epochs, longer)):
            evals = history[(history.event == "eval") & (history.pattern == "dense")]
            convergence += [dict(family=family, run_epochs=run_epochs, seed=int(r.seed), epoch=int(r.epoch) + 1,
                                 test_accuracy=float(r.test_accuracy)) for r in evals.itertuples()]
        trained = runs.summary[["pattern", "seed", "test_accuracy", "test_loss"]]
        for row in rows:
            if row["family"] == family:
                match = trained[(trained.pattern == row["pattern"]) & (trained.seed == row["seed"])]
                row.update(test_accuracy=float(match.test_accuracy.iloc[0]) if len(match) else float("nan"),
                           test_loss=float(match.test_loss.iloc[0]) if len(match) else float("nan"))
        histories.append(runs.history.assign(family=family))
    bar.close()
    frame = pd.DataFrame(rows)
    frame.attrs["spread"] = pd.concat(spreads, ignore_index=True)
    frame.attrs["history"] = pd.concat(histories, ignore_index=True)
    frame.attrs["spectra"] = pd.concat(spectrum_frames, ignore_index=True)[
        ["family", "pattern", "seed", "index", "eigenvalue", "normalized"]]
    frame.attrs["convergence"] = pd.DataFrame(convergence, columns=["family", "run_epochs", "seed", "epoch",
                                                                    "test_accuracy"])
    frame.attrs["config"] = asdict(cfg)
    return frame


def method_table(model, x1, x2=None, methods=("loop", "jacobian", "ntvp", "structured", "auto")) -> pd.DataFrame:
    """Every NTK method on the same inputs: seconds and largest difference from the loop.

    Args:
        model: any model; use float64 (``model.double()``) to see agreement to rounding.
        x1, x2: inputs, as for :func:`pixelfly_lab.ntk.empirical_ntk`.
        methods: methods to run; 'loop' (the reference) is always run first.

    Returns:
        DataFrame with columns method, seconds, max_abs_diff (against the loop's kernel).
    """

    rows, reference = [], None
    for method in ("loop",) + tuple(m for m in methods if m != "loop"):
        start = time.perf_counter()
        kernel = empirical_ntk(model, x1, x2, method=method, progress=False)
        seconds = time.perf_counter() - start
        reference = kernel if reference is None else reference
        rows.append(dict(method=method, seconds=seconds, max_abs_diff=float((kernel - reference).abs().max())))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- figures
def plot_kernel(kernel: torch.Tensor, title: str = "empirical NTK", labels=None):
    """The (N, N) kernel as an image; with ``labels`` ticks mark where each class starts."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4))
    image = ax.imshow(kernel.detach().cpu().numpy(), cmap="viridis")
    fig.colorbar(image, ax=ax, shrink=0.85, label="K(x, x')")
    if labels is not None:
        labels = list(map(int, labels))
        starts = [i for i in range(len(labels)) if i == 0 or labels[i] != labels[i - 1]]
        ax.set_xticks(starts, [labels[i] for i in starts], fontsize=7)
        ax.set_yticks(starts, [labels[i] for i in starts], fontsize=7)
    ax.set(xlabel="example x' (sorted by class)" if labels is not None else "example x'",
           ylabel="example x", title=title)
    return fig


def _colours(patterns) -> dict:
    """Dense in dark grey; the others in matplotlib's cycle, skipping its grey (C7)."""
    others = [p for p in patterns if p != "dense"]
    return {"dense": "0.3", **{p: f"C{i + (i >= 7)}" for i, p in enumerate(others)}}


def _panels(families, width=5.0, height=3.6):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(families), figsize=(width * len(families), height), squeeze=False)
    return fig, dict(zip(families, axes[0]))


def _label(metric: str) -> str:
    return {"relative_frobenius_centered": "rel. Frobenius of centred, trace-normalised kernels",
            "relative_frobenius_normalized": "rel. Frobenius of trace-normalised kernels", "cka": "1 - CKA",
            "relative_frobenius": "relative Frobenius (raw)"}.get(metric, metric.replace("_", " "))


def plot_distance_at_init(frame: pd.DataFrame, metric: str = "relative_frobenius_centered"):
    """Bar per pattern: the distance at initialisation (mean and sd over seeds), with the dense
    seed-to-seed spread (mean +- sd of ``frame.attrs['spread']``) as a grey band, per family."""
    families = list(frame.family.unique())
    fig, axes = _panels(families)
    spread = frame.attrs.get("spread")
    for family, ax in axes.items():
        stats = frame[frame.family == family].groupby("pattern", sort=False)[metric].agg(["mean", "std"])
        colours = _colours(stats.index)
        ax.bar(range(len(stats)), stats["mean"], yerr=stats["std"].fillna(0), capsize=3,
               color=[colours[p] for p in stats.index])
        if spread is not None and len(spread):
            ref = spread[(spread.family == family) & (spread.metric == metric)].iloc[0]
            ax.axhspan(ref["mean"] - ref["sd"], ref["mean"] + ref["sd"], color="0.8", zorder=0,
                       label="dense seed-to-seed (mean +- sd)")
            ax.legend(fontsize=7)
        ax.set_xticks(range(len(stats)), stats.index, rotation=35, fontsize=8)
        ax.set(xlabel="pattern (same budget)", ylabel=f"NTK distance ({_label(metric)})",
               title=f"{family}: NTK distance to dense at init")
    fig.tight_layout()
    return fig


def plot_distance_vs_accuracy(frame: pd.DataFrame, metric: str = "relative_frobenius_centered"):
    """The paper's picture without dense: NTK distance at init against test accuracy after training,
    one point per sparse pattern (mean over seeds, bars one sd)."""
    families = list(frame.family.unique())
    fig, axes = _panels(families)
    for family, ax in axes.items():
        part = frame[(frame.family == family) & (frame.pattern != "dense")]
        stats = part.groupby("pattern", sort=False).agg(d=(metric, "mean"), d_sd=(metric, "std"),
                                                        a=("test_accuracy", "mean"), a_sd=("test_accuracy", "std"))
        colours = _colours(stats.index)
        for pattern, row in stats.iterrows():
            ax.errorbar(row.d, 100 * row.a, xerr=row.d_sd if row.d_sd == row.d_sd else None,
                        yerr=100 * row.a_sd if row.a_sd == row.a_sd else None, fmt="o", ms=4, capsize=2,
                        color=colours[pattern])
            ax.annotate(pattern, (row.d, 100 * row.a), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=f"NTK distance at init ({_label(metric)})", ylabel="test accuracy after training (%)",
               title=f"{family}: NTK distance vs accuracy (sparse patterns)")
    fig.tight_layout()
    return fig


def plot_spectra(spectrum: pd.DataFrame):
    """Normalised NTK eigenvalues at initialisation (largest first, log scale) per pattern, first seed."""
    families = list(spectrum.family.unique())
    fig, axes = _panels(families)
    for family, ax in axes.items():
        part = spectrum[spectrum.family == family]
        part = part[part.seed == part.seed.min()]
        colours = _colours(part.pattern.unique())
        for pattern, rows in part.groupby("pattern", sort=False):
            ax.semilogy(rows["index"] + 1, rows["normalized"].clip(lower=1e-12), color=colours[pattern],
                        label=pattern, lw=1.2)
        ax.set(xlabel="eigenvalue rank", ylabel="eigenvalue / trace", title=f"{family}: NTK spectrum at init")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig
