"""The NTK study: how far each sparsity pattern's neural tangent kernel is from the dense model's.

The Pixelfly paper (Dao, Chen et al., ICLR 2022, arXiv 2112.00029) chooses its fixed pattern by
the neural tangent kernel: a sparse network whose NTK stays close to the dense network's should
train like it, and among patterns at the same budget the flat block butterfly + low-rank one
(Pixelfly) is the closest; the NTK distance also ranks the patterns' final accuracies.

Here, for each model family (MLP, small MLP-Mixer on scikit-learn's digits), each pattern at the
same budget and several seeds, we measure

    d(K_sparse, K_ref) = ||K_sparse - K_ref||_F / ||K_ref||_F    (and alignment / CKA distances)

with K the empirical NTK (:func:`pixelfly_lab.ntk.empirical_ntk`) on held-out digits and K_ref
the mean kernel of dense models of other seeds (the mean is the finite-width estimate of the
dense kernel; 'dense' itself then shows the seed-to-seed floor). Every model, the references
included, then takes a few full-batch Adam steps on a digits subset and the distance is
measured again along the way, beside the loss and the test accuracy. The kernels' eigenvalue
spectra (at initialisation and at the end) come with the table.

:mod:`pixelfly_lab.studies.ntk` composes this into the ``reproduce`` study 'ntk' (figures and claims).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import load_data
from .models import build_model, count_params
from .ntk import DISTANCE_METRICS, empirical_ntk, kernel_distance, spectra

__all__ = ["STUDY_PATTERNS", "NTKStudyConfig", "QUICK", "ntk_study", "method_table", "plot_kernel",
           "plot_distance_at_init", "plot_distance_over_training", "plot_distance_vs_accuracy", "plot_spectra"]

STUDY_PATTERNS = ("dense", "lowrank", "random", "local", "bigbird", "butterfly", "pixelfly", "monarch")


@dataclass(frozen=True)
class NTKStudyConfig:
    """What :func:`ntk_study` runs. The defaults are the full CPU run (tens of minutes)."""

    families: tuple = ("mlp", "mixer")
    patterns: tuple = STUDY_PATTERNS
    seeds: tuple = (0, 1, 2)
    # dense models averaged into the reference kernel; seeds apart from ``seeds``
    reference_seeds: tuple = (100, 101, 102)
    budget: float = 0.25            # the training lab's budget
    # 8, not the training lab's 16: at 16 the Mixer's 64x256 channel MLPs have a 4x16 block grid
    # on which local, butterfly and pixelfly are the same layout (and pixelfly has no rank left)
    block_size: int = 8
    size: str = "tiny"              # models.SIZES preset: MLP 64-256-256-10, Mixer dim 64
    n_kernel: int = 128             # held-out digits the kernels are computed on
    n_train: int = 256              # training subset, one full batch
    steps: int = 40                 # Adam steps: "a short training", the kernel's early drift
    eval_every: int = 10            # kernels at steps 0, 10, 20, ...
    lr: float = 3e-3                # the training lab's digits learning rate
    device: str = "cpu"


# 1-2 minutes on a 2-core CPU: two seeds against two references, kernels at the start and the end.
QUICK = NTKStudyConfig(seeds=(0, 1), reference_seeds=(100, 101), n_kernel=32, n_train=128, steps=10,
                       eval_every=10)


def _train_and_measure(family: str, pattern: str, seed: int, data, cfg: NTKStudyConfig) -> list[dict]:
    """Build one model, take ``cfg.steps`` full-batch Adam steps, record kernels and metrics."""
    device = torch.device(cfg.device)
    model = build_model(family, data, size=cfg.size, pattern=pattern, budget=cfg.budget,
                        block_size=cfg.block_size, seed=seed).to(device)
    x_train, y_train = data.x_train[:cfg.n_train].to(device), data.y_train[:cfg.n_train].to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    probe = x_test[:cfg.n_kernel]
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    records = []
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            with torch.no_grad():
                loss = float(F.cross_entropy(model(x_train), y_train))
                accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
            records.append(dict(family=family, pattern=pattern, seed=seed, step=step, params=count_params(model),
                                density=count_params(model) / model.dense_params, train_loss=loss,
                                test_accuracy=accuracy, kernel=empirical_ntk(model, probe, progress=False).cpu()))
        if step == cfg.steps:
            break
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        optimizer.step()
    return records


def ntk_study(config: NTKStudyConfig | None = None, *, progress: bool = True, **overrides) -> pd.DataFrame:
    """Distance of each pattern's NTK to the dense NTK, at initialisation and along training.

    Args:
        config: an :class:`NTKStudyConfig` (default: the full run; :data:`QUICK` for minutes).
        progress: show a progress bar over models.
        **overrides: fields of the config to replace, e.g. ``seeds=(0,)``.

    Returns:
        DataFrame, one row per (family, pattern, seed, step): params, density, train_loss,
        test_accuracy, kernel_trace, and the distance to the reference kernel of the same step
        for each metric of :data:`pixelfly_lab.ntk.DISTANCE_METRICS` (``relative_frobenius``,
        ``alignment``, ``cka``). ``frame.attrs['spectra']`` holds the eigenvalue spectra of the
        kernels at the first and last step (columns family, pattern, seed, step, index,
        eigenvalue, normalized), ``frame.attrs['config']`` the config used.

    Example:
        >>> frame = ntk_study(QUICK, families=("mlp",), patterns=("dense", "pixelfly"))
        >>> frame.groupby("pattern").relative_frobenius.mean()   # doctest: +SKIP
    """
    cfg = replace(config or NTKStudyConfig(), **overrides)
    unknown = set(cfg.patterns) - set(STUDY_PATTERNS)
    if unknown:
        raise ValueError(f"patterns {sorted(unknown)} are not studied here; choose from {STUDY_PATTERNS}")
    if cfg.eval_every < 1 or cfg.steps < 0:
        raise ValueError(f"eval_every must be >= 1 and steps >= 0, got {cfg.eval_every} and {cfg.steps}")
    data = load_data("digits")
    jobs = [(f, "dense", s, True) for f in cfg.families for s in cfg.reference_seeds]
    jobs += [(f, p, s, False) for f in cfg.families for p in cfg.patterns for s in cfg.seeds]
    records, references = [], {}
    for family, pattern, seed, is_reference in tqdm(jobs, desc="NTK study", unit="model", disable=not progress):
        runs = _train_and_measure(family, pattern, seed, data, cfg)
        if is_reference:
            for run in runs:
                references.setdefault((family, run["step"]), []).append(run["kernel"])
        else:
            records += runs
    reference = {key: torch.stack(kernels).mean(0) for key, kernels in references.items()}
    rows, spectrum_frames = [], []
    last = max(r["step"] for r in records)
    for record in records:
        kernel = record.pop("kernel")
        ref = reference[record["family"], record["step"]]
        record["kernel_trace"] = float(kernel.double().trace())
        record.update({metric: kernel_distance(kernel, ref, metric) for metric in DISTANCE_METRICS})
        rows.append(record)
        if record["step"] in (0, last):
            frame = spectra(kernel)
            spectrum_frames.append(frame.drop(columns="name").assign(
                **{k: record[k] for k in ("family", "pattern", "seed", "step")}))
    frame = pd.DataFrame(rows)
    frame.attrs["spectra"] = pd.concat(spectrum_frames, ignore_index=True)[
        ["family", "pattern", "seed", "step", "index", "eigenvalue", "normalized"]]
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
    import time

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


def plot_distance_at_init(frame: pd.DataFrame, metric: str = "relative_frobenius"):
    """Bar per pattern: the distance at step 0 (mean over seeds, bars from min to max), per family."""
    families = list(frame.family.unique())
    fig, axes = _panels(families)
    for family, ax in axes.items():
        init = frame[(frame.family == family) & (frame.step == 0)]
        stats = init.groupby("pattern", sort=False)[metric].agg(["mean", "min", "max"])
        colours = _colours(stats.index)
        ax.bar(range(len(stats)), stats["mean"], color=[colours[p] for p in stats.index], capsize=3,
               yerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]])
        ax.set_xticks(range(len(stats)), stats.index, rotation=35, fontsize=8)
        ax.set(xlabel="pattern (same budget)", ylabel=f"NTK distance ({metric.replace('_', ' ')})",
               title=f"{family}: NTK distance to dense at init")
    fig.tight_layout()
    return fig


def plot_distance_over_training(frame: pd.DataFrame, metric: str = "relative_frobenius"):
    """Distance to the (equally trained) dense reference against the training step, per family."""
    families = list(frame.family.unique())
    fig, axes = _panels(families)
    for family, ax in axes.items():
        part = frame[frame.family == family]
        colours = _colours(part.pattern.unique())
        for pattern, rows in part.groupby("pattern", sort=False):
            mean = rows.groupby("step")[metric].mean()
            ax.plot(mean.index, mean.values, marker="o", ms=3, color=colours[pattern], label=pattern)
        ax.set(xlabel="full-batch Adam step", ylabel=f"NTK distance ({metric.replace('_', ' ')})",
               title=f"{family}: NTK distance along training")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_distance_vs_accuracy(frame: pd.DataFrame, metric: str = "relative_frobenius"):
    """The paper's picture: NTK distance at init against final test accuracy, one point per pattern."""
    families = list(frame.family.unique())
    fig, axes = _panels(families)
    last = frame.step.max()
    for family, ax in axes.items():
        part = frame[frame.family == family]
        dist = part[part.step == 0].groupby("pattern", sort=False)[metric].mean()
        acc = part[part.step == last].groupby("pattern", sort=False).test_accuracy.mean()
        colours = _colours(dist.index)
        for pattern in dist.index:
            ax.scatter(dist[pattern], 100 * acc[pattern], color=colours[pattern], s=30)
            ax.annotate(pattern, (dist[pattern], 100 * acc[pattern]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set(xlabel=f"NTK distance at init ({metric.replace('_', ' ')})",
               ylabel=f"test accuracy after {last} steps (%)", title=f"{family}: NTK distance vs accuracy")
    fig.tight_layout()
    return fig


def plot_spectra(spectrum: pd.DataFrame, step: int = 0):
    """Normalised NTK eigenvalues (largest first, log scale) per pattern at ``step``, first seed."""
    families = list(spectrum.family.unique())
    fig, axes = _panels(families)
    for family, ax in axes.items():
        part = spectrum[(spectrum.family == family) & (spectrum.step == step)]
        part = part[part.seed == part.seed.min()]
        colours = _colours(part.pattern.unique())
        for pattern, rows in part.groupby("pattern", sort=False):
            ax.semilogy(rows["index"] + 1, rows["normalized"].clip(lower=1e-12), color=colours[pattern],
                        label=pattern, lw=1.2)
        ax.set(xlabel="eigenvalue rank", ylabel="eigenvalue / trace",
               title=f"{family}: NTK spectrum at step {step}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig

