"""The training study's pass rules: parity with dense, and "Pixelfly is the pattern to use", with controls and gates.

What the paper claims (Dao, Chen et al., ICLR 2022, arXiv 2112.00029, Sec. 5): sparse models with
the Pixelfly pattern reach the dense models' quality with a fraction of the parameters, and
Pixelfly is the pattern to use at a given budget. Every comparison is paired by seed and decided by
:func:`pixelfly_lab.studies.stats.paired_decision` (90% t interval of the mean difference); the
primary Pixelfly layers (:data:`VARIANTS`: the library's ungated layer and the authors' gated,
Kaiming-initialised one) at every budget of a task form one Holm family
(:func:`pixelfly_lab.studies.claims.family_claim`, no headline: every member is primary), so a
claim tried at two budgets is counted once. The rules, fixed before measuring:

* parity: not worse than dense by more than the task's margin. A budget decides nothing when its
  controls misbehave: the negative controls (:data:`NEGATIVE_CONTROLS`, low-rank and
  random+lowrank) must be refuted by the same rule before parity can be held, and the positive
  control (dense against dense of other seeds) must not be refuted; and it is 'undecided (not
  converged)' while dense still gains more than :data:`CONVERGENCE_SHARE` of the margin between
  its last two evaluations (a parity verdict on a run that has not converged says nothing).
* best other: not worse than any other sparse pattern (so than the best of them) by more than
  :data:`BEST_OTHER_SHARE` of the margin, intersection-union over the others. The same rule is run
  for every other pattern; a budget decides "held" only when some other pattern fails it (is
  refuted): otherwise the task does not separate patterns and the claim is undecided, which the
  measured text says. A task may name patterns that must fail the rule (``TaskSpec.must_fail``:
  low-rank and random on the teacher with Pixelfly's structure).

Example:
    >>> import pandas as pd
    >>> summary = pd.DataFrame({"pattern": ["dense", "pixelfly"] * 3, "seed": [0, 0, 1, 1, 2, 2],
    ...                         "test_accuracy": [0.80, 0.79, 0.81, 0.80, 0.79, 0.79]})
    >>> parity_claims(TaskSpec("toy", "mlp", "mnist1d", "test_accuracy", 2.0), summary, None, None)[0].held is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from pixelfly_lab.studies.claims import Claim, family_claim
from pixelfly_lab.studies.stats import Decision, every_held, paired_decision

__all__ = ["TaskSpec", "TaskRuns", "parity_claims", "task_claims", "sparsified_budgets", "dense_gain", "VARIANTS",
           "NEGATIVE_CONTROLS", "ALL_PATTERNS", "ALPHA", "BEST_OTHER_SHARE", "CONVERGENCE_SHARE", "UNDER_BUDGET"]

VARIANTS = ("pixelfly", "pixelfly-gated")    # not "other patterns": the gated layer is Pixelfly too
ALL_PATTERNS = ("dense", "pixelfly", "pixelfly-gated", "lowrank", "random+lowrank", "butterfly", "random", "local",
                "monarch")
# a pattern whose sparsified layers hold more than this share fewer parameters than Pixelfly's (or than the
# budget, when Pixelfly uses less: at 0.1 every pattern lands at ~0.094) is left out of "best other"
UNDER_BUDGET = 0.05
ALPHA = 0.05  # level of each one-sided test (90% t intervals)
NEGATIVE_CONTROLS = ("lowrank", "random+lowrank")  # parity must refute these for the task to tell patterns apart
# "not worse than the best other" by at most this share of the parity margin (1 point of MNIST-1D's 2)
BEST_OTHER_SHARE = 0.5
# dense "still gains" when its metric improves by more than this share of the margin between its last two
# evaluations (0.5 points of MNIST-1D's 2): a parity verdict is then 'undecided (not converged)'
CONVERGENCE_SHARE = 0.25
LOSSES = ("val_loss", "test_mse")  # metrics where lower is better (margins are relative excesses)


@dataclass(frozen=True)
class TaskSpec:
    """One task of the comparison.

    Attributes:
        label: its name in figures and claims; tasks with one label at several budgets are one family.
        model, data: :class:`pixelfly_lab.training.loop.TrainConfig`'s model and data.
        metric: the summary column compared ('test_accuracy', or a loss: 'val_loss', 'test_mse').
        margin: parity margin: accuracy points (accuracy) or a relative excess (loss: 0.05 = 5%).
        patterns, seeds: what is trained.
        train: other TrainConfig fields (epochs, sizes, block size, ...).
        kind: 'paper' (verdicts), 'check' (a control of the study itself, e.g. a task built so that
            patterns must separate) or 'info' (a reading: a run too short for a verdict).
        positive_control: train dense again with other seeds (the positive control of parity).
        parity: make the parity claim (False: only "best other", e.g. a teacher-student task).
        must_fail: other patterns that must fail the best-other rule for it to be held.
        statement: the best-other claim's statement, when not the paper's Sec. 5 one.
    """

    label: str
    model: str
    data: str
    metric: str
    margin: float
    patterns: tuple = ALL_PATTERNS
    seeds: tuple = (0, 1, 2)
    train: dict = field(default_factory=dict)
    kind: str = "paper"
    positive_control: bool = True
    parity: bool = True
    must_fail: tuple = ()
    statement: str | None = None

    def __post_init__(self):
        if self.kind not in ("paper", "check", "info"):
            raise ValueError(f"kind must be 'paper', 'check' or 'info', got {self.kind!r}")

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOSSES

    @property
    def budget(self) -> float:
        return self.train.get("budget", 0.25)


@dataclass
class TaskRuns:
    """What one task's training gave, for the rules.

    Attributes:
        task: the task.
        summary: one row per run: pattern, seed, ``task.metric`` (and steps, epochs when known).
        png, csv: the figure and table its claims point to.
        budgets: {pattern: its sparsified layers' parameter share} (:func:`sparsified_budgets`).
        control: the positive control, dense trained again with other seeds (pattern, seed,
            ``task.metric``), paired with dense's seeds in order; None: none.
        history: the runs' history (event, pattern, step, ``task.metric``): dense's last two
            evaluations decide convergence; None: not checked (said so).
    """

    task: TaskSpec
    summary: pd.DataFrame
    png: str | None = None
    csv: str | None = None
    budgets: dict | None = None
    control: pd.DataFrame | None = None
    history: pd.DataFrame | None = None


def sparsified_budgets(models: dict) -> dict:
    """{pattern: parameters of its sparsified layers / those layers' dense parameters} (first seed's model)."""
    budgets = {}
    for (pattern, _), model in models.items():
        report = getattr(model, "report", None)
        if pattern in budgets or report is None or not len(report) or not report["replaced"].any():
            continue
        replaced = report[report["replaced"]]
        budgets[pattern] = float(replaced["params_after"].sum() / replaced["params_before"].sum())
    return budgets


def _describe(value: float, task: TaskSpec) -> str:
    return f"{100 * value:.1f}%" if task.higher_is_better else f"{value:.3f}"


def _margin_text(task: TaskSpec, margin: float) -> str:
    return f"{margin:g} point{'' if margin == 1 else 's'}" if task.higher_is_better else f"{100 * margin:g}%"


def _gain(task: TaskSpec, new: float, old: float) -> float:
    """How much better ``new`` is than ``old`` in the margin's units (points, or relative for a loss)."""
    return 100 * (new - old) if task.higher_is_better else -(new / old - 1)


def _differences(task: TaskSpec, table: pd.DataFrame, a: str, b: str) -> np.ndarray:
    """Per-seed differences of pattern ``a`` against ``b`` in the margin's units, signed "a better = large".

    ``table``: seed x pattern values of ``task.metric``; seeds missing on either side are dropped.
    """
    pair = table[[a, b]].dropna()
    return np.asarray(_gain(task, pair[a], pair[b]), dtype=float)


def _not_worse(task, table, a, b, margin) -> Decision:
    return paired_decision(_differences(task, table, a, b), margin=-margin, alternative="greater", alpha=ALPHA)


def dense_gain(task: TaskSpec, history: pd.DataFrame | None) -> float | None:
    """Dense's gain between its last two evaluations (mean over seeds), in the margin's units; None if unknown."""
    if history is None or "event" not in history or task.metric not in history:
        return None
    evals = history[(history.event == "eval") & (history.pattern == "dense")]
    curve = evals.groupby("step")[task.metric].mean().sort_index().dropna()
    return None if len(curve) < 2 else float(_gain(task, curve.iloc[-1], curve.iloc[-2]))


@dataclass
class _Part:
    """One budget's members of a family, what they measured, and what keeps them from a verdict."""

    budget: float
    decisions: dict          # member name -> Decision
    text: str                # the measured text of this budget
    gate: str | None = None  # why this budget decides nothing (or no 'held'), None when it may decide
    blocks: str = "all"      # 'all': no verdict at all; 'held': refuted still stands
    seeds_fix: bool = True   # whether more seeds could lift the gate


def _setup(r: TaskRuns, length: str) -> str:
    task, summary = r.task, r.summary
    stats = summary.groupby("pattern", sort=False)[task.metric].agg(["mean", "std"])
    stats["std"] = stats["std"].fillna(0.0)
    listing = ", ".join(f"{p} {_describe(s['mean'], task)}+-{_describe(s['std'], task)}" for p, s in stats.iterrows())
    setup = f"{task.label}{length}, budget {task.budget:g}, {summary.seed.nunique()} seed(s), mean +- sd: {listing}"
    budgets = r.budgets or {}
    if budgets:
        short = _short(r)
        setup += (f"; sparsified layers' parameters / dense's (target {task.budget:g}): "
                  + ", ".join(f"{p} {b:.3f}" for p, b in budgets.items())
                  + (f"; more than {100 * UNDER_BUDGET:g}% under Pixelfly's share (or the target), left out of the "
                     f"best-other comparison (parity still compares them): {', '.join(short)}" if short else ""))
    return setup


def _short(r: TaskRuns) -> list:
    """Patterns using more than UNDER_BUDGET fewer parameters than Pixelfly (or than the budget, if less)."""
    budgets = r.budgets or {}
    reference = min(r.task.budget, budgets.get("pixelfly", r.task.budget))
    return [p for p, b in budgets.items() if b < (1 - UNDER_BUDGET) * reference]


def _parity_part(r: TaskRuns, table: pd.DataFrame, variants: list, setup: str) -> _Part | None:
    task = r.task
    if not task.parity or "dense" not in table.columns:
        return None
    decisions = {v: _not_worse(task, table, v, "dense", task.margin) for v in variants}
    notes, gate, blocks, seeds_fix = [], None, "all", True
    negatives = {c: _not_worse(task, table, c, "dense", task.margin) for c in NEGATIVE_CONTROLS if c in table.columns}
    if not negatives:
        notes.append("no negative control (low-rank) trained")
    for c, d in negatives.items():
        notes.append(f"negative control {c} - dense {d.describe(2)}: {d.verdict} (must be refuted)")
    positive = None
    if r.control is not None and len(r.control):
        dense, again = table["dense"].dropna().to_numpy(), r.control.sort_values("seed")[task.metric].to_numpy()
        m = min(len(dense), len(again))
        positive = _not_worse(task, pd.DataFrame({"again": again[:m], "dense": dense[:m]}), "again", "dense",
                              task.margin)
        notes.append(f"positive control dense (other seeds) - dense {positive.describe(2)}: {positive.verdict} "
                     f"(must not be refuted)")
    else:
        notes.append("no positive control trained")
    gain = dense_gain(task, r.history)
    limit = CONVERGENCE_SHARE * task.margin
    if gain is None:
        notes.append("convergence not checked (no learning curve)")
    else:
        notes.append(f"dense's gain over its last evaluation interval {gain:+.3g} "
                     f"({'points' if task.higher_is_better else 'relative'}; converged when <= {limit:g})")
    if positive is not None and positive.verdict == "refuted":
        gate, seeds_fix = "the positive control failed (dense against dense refuted)", False
    elif gain is not None and gain > limit:
        gate, seeds_fix = "not converged (dense still gains more than the stated margin)", False
    elif not negatives or any(d.verdict != "refuted" for d in negatives.values()):
        gate, blocks, seeds_fix = "the task does not tell patterns apart (a negative control is not refuted)", \
            "held", False
    text = "; ".join(f"{v} - dense {decisions[v].describe(2)}" for v in variants) + "; " + "; ".join(notes)
    return _Part(task.budget, decisions, f"{text}; {setup}", gate, blocks, seeds_fix)


def _best_other_part(r: TaskRuns, table: pd.DataFrame, variants: list, setup: str) -> _Part | None:
    task, short = r.task, _short(r)
    others = [p for p in r.summary.pattern.unique() if p not in VARIANTS + ("dense",) and p not in short]
    if not others:
        return None
    margin = BEST_OTHER_SHARE * task.margin
    decisions, criticals = {}, {}
    for v in variants:
        criticals[v], decisions[v] = every_held({o: _not_worse(task, table, v, o, margin) for o in others})
    rule = {}   # the same rule for every other pattern, against every pattern but itself (Pixelfly's layers too)
    for o in others:
        rivals = [p for p in others + variants if p != o]
        critical, whole = every_held({p: _not_worse(task, table, o, p, margin) for p in rivals})
        rule[o] = (whole.verdict, critical)
    failing = [o for o, (verdict, _) in rule.items() if verdict == "refuted"]
    missing = [p for p in task.must_fail if p in rule and rule[p][0] != "refuted"]
    gate = None
    if not failing:
        gate = "the task does not separate patterns: no other pattern fails the same rule"
    elif missing:
        gate = f"{', '.join(missing)} did not fall behind (must fail the same rule on this task)"
    text = ("; ".join(f"{v} - {criticals[v]} (critical) {decisions[v].describe(2)}" for v in variants)
            + "; the same rule for every other pattern: "
            + ", ".join(f"{o} {verdict} (critical: {critical})" for o, (verdict, critical) in rule.items())
            + f"; {setup}")
    return _Part(task.budget, {f"{v} (critical: {criticals[v]})": d for v, d in decisions.items()}, text, gate,
                 "held", False)


def _family_claim(parts: list[_Part], statement: str, rule: str, kind: str, png, csv) -> Claim:
    """One Claim from the parts of a family: Holm across every member of every budget, then each budget's gate."""
    several = len(parts) > 1
    decisions = {(f"{name} @{p.budget:g}" if several else name): d for p in parts for name, d in p.decisions.items()}
    family = family_claim(decisions, alpha=ALPHA)
    verdicts, to_decide, blocked = dict(zip(family.names, family.verdicts)), dict(zip(family.names, family.to_decide)), []
    for p in parts:
        for name, d in p.decisions.items():
            n = f"{name} @{p.budget:g}" if several else name
            if p.gate and (p.blocks == "all" or verdicts[n] == "held") and verdicts[n] != "undecided":
                verdicts[n] = "undecided"
                blocked.append(n)
            heading_held = d.mean > d.boundary()   # a gate on 'held' leaves a way to 'refuted' open to more seeds
            if p.gate and not p.seeds_fix and verdicts[n] == "undecided" and (p.blocks == "all" or heading_held):
                to_decide[n] = None
    members = list(verdicts.values())
    verdict = "held" if "held" in members else "refuted" if all(m == "refuted" for m in members) else "undecided"
    family = replace(family, verdict=verdict, verdicts=tuple(verdicts[n] for n in family.names),
                     to_decide=tuple(to_decide[n] for n in family.names))
    gates = [f"budget {p.budget:g}: undecided: {p.gate}" for p in parts if p.gate]
    if several:   # each budget's own verdict: a budget whose every member is refuted says so
        for budget in dict.fromkeys(p.budget for p in parts):
            own = [v for n, v in verdicts.items() if n.endswith(f" @{budget:g}")]
            word = "held" if "held" in own else "refuted" if all(v == "refuted" for v in own) else "undecided"
            gates.insert(0, f"budget {budget:g} alone: {word}")
    if blocked:
        gates.append(f"held back by the gates: {', '.join(blocked)}")
    measured = (f"verdict: {verdict}; " + family.describe(2) + "; " + "; ".join(gates + [
        (f"budget {p.budget:g}: " if several else "") + p.text for p in parts]))
    more_seeds = any(v == "undecided" and to_decide[n] for n, v in verdicts.items())
    fields = family.fields(more_seeds_decide=more_seeds)
    if kind == "info":
        fields["held"] = None
    return Claim(f"{statement}. {rule}", measured, **fields, figure=png, kind=kind, table=csv)


def _length(summary: pd.DataFrame) -> str:
    if "steps" in summary and "epochs" in summary:
        return f" after {int(summary.steps.max())} steps ({int(summary.epochs.max())} epoch(s))"
    return ""


def task_claims(results: list[TaskRuns]) -> list[Claim]:
    """The pass rules of the module docstring over tasks; one parity and one best-other family per task label.

    Args:
        results: each task's runs (a task at several budgets: one :class:`TaskRuns` per budget,
            same label).

    Returns:
        Claims in the order of the labels: [parity family, best-other family] each where it
        applies (kind ``task.kind``; an 'info' task states what the rule would say).
    """
    claims = []
    for label in dict.fromkeys(r.task.label for r in results):
        group = [r for r in results if r.task.label == label]
        task = group[0].task
        parity_parts, best_parts = [], []
        for r in group:
            table = r.summary.pivot_table(index="seed", columns="pattern", values=task.metric)
            variants = [v for v in VARIANTS if v in table.columns]
            if not variants:
                continue
            setup = _setup(r, _length(r.summary))
            parity_parts.append(_parity_part(r, table, variants, setup))
            best_parts.append(_best_other_part(r, table, variants, setup))
        parity_parts, best_parts = [p for p in parity_parts if p], [p for p in best_parts if p]
        budgets = ", ".join(f"{p.budget:g}" for p in (parity_parts or best_parts))
        where = f"{label}, budget(s) {budgets}{_length(group[0].summary)}"
        interval = f"{100 * (1 - 2 * ALPHA):.0f}% t interval"
        family = (f"One family: the primary Pixelfly layers ({', '.join(VARIANTS)}; 'pixelfly-gated' is the authors' "
                  f"gated, Kaiming-initialised layer) at every budget, Holm-corrected; the family holds when one "
                  f"member holds and did not hold only when every member is refuted (each budget's own verdict "
                  f"is printed beside it)")
        if parity_parts:
            claims.append(_family_claim(parity_parts, (
                f"Pixelfly paper (Sec. 5, Tables 1-4): Pixelfly models match the dense model's quality with a "
                f"fraction of the parameters -- {where}"), (
                f"{family}. Per member, per seed, its {task.metric.replace('_', ' ')} minus dense's "
                f"({'points' if task.higher_is_better else 'relative excess of the loss, sign flipped'}): held when "
                f"the {interval} of the mean lies above -{_margin_text(task, task.margin)} (not worse than dense by "
                f"more than the margin), refuted when it lies below; a budget decides only when its controls "
                f"behave: low-rank and random+lowrank at the same budget (negative controls) refuted by the same "
                f"rule, dense against dense of other seeds (positive control) not refuted, and dense converged "
                f"(its gain between its last two evaluations at most {_margin_text(task, CONVERGENCE_SHARE * task.margin)}"
                f", else 'undecided (not converged)'); otherwise undecided"), task.kind, group[0].png, group[0].csv))
        if best_parts:
            margin = BEST_OTHER_SHARE * task.margin
            others = sorted({p for r in group for p in r.summary.pattern.unique()
                             if p not in VARIANTS + ("dense",) and p not in _short(r)}, key=list(ALL_PATTERNS).index)
            statement = task.statement or "Pixelfly paper (Sec. 5): Pixelfly is the pattern to use at a given budget"
            claims.append(_family_claim(best_parts, f"{statement} -- {where}: not worse than any of "
                                        f"{{{', '.join(others)}}} (so not worse than the best of them) by more than "
                                        f"{_margin_text(task, margin)}", (
                f"{family}. Per member, paired by seed against each other pattern, held when every {interval} of the "
                f"mean difference lies above -{_margin_text(task, margin)} (intersection-union), refuted when Holm "
                f"across the others puts one below it. The same rule is run for every other pattern; a budget "
                f"holds only when some other pattern fails it (else the task does not separate patterns: undecided)"
                + (f"; on this task {', '.join(task.must_fail)} must fail it" if task.must_fail else "")),
                task.kind, group[0].png, group[0].csv))
    return claims


def parity_claims(task: TaskSpec, summary: pd.DataFrame, png: str | None, csv: str | None, budgets: dict | None = None,
                  control: pd.DataFrame | None = None, history: pd.DataFrame | None = None) -> list[Claim]:
    """The rules of one task at one budget (:func:`task_claims` of one :class:`TaskRuns`).

    Args:
        task, summary, png, csv, budgets, control, history: the fields of :class:`TaskRuns`.

    Returns:
        [parity family, best-other family] where they apply.
    """
    return task_claims([TaskRuns(task, summary, png, csv, budgets, control, history)])
