"""What a study hands to the report: the claims it checked, and its figures and tables on disk.

A study (see :mod:`pixelfly_lab.studies`) writes its figures (PNG and PDF, via
:func:`save_figure`) and tables (CSV, via :func:`save_table`) into its output folder and returns
a list of :class:`Claim`. Each claim has a *kind*:

* ``'paper'``: a statement of the Pixelfly paper (Dao, Chen et al., ICLR 2022, arXiv 2112.00029)
  or of the authors' talk that this run could find false. Its text names the source (section,
  figure, table or theorem), and states the condition and the threshold that decide it; both are
  fixed in the code before anything is measured.
* ``'check'``: an oracle or sanity check that holds whenever the code is right (an exact density,
  a slope that the algebra fixes, an oracle that nothing can beat, a class that contains another).
  A failure means a bug.
* ``'target'``: one of the toolkit's own speed targets (not a paper claim): shown in its own
  section of the report with the machine's load and dense GEMM rate; a miss is reported as a
  miss, never as a failed check or a refuted paper claim (a loaded machine misses them).
* ``'info'``: a measurement shown for reading, with no verdict (``held`` is None).

A comparison claim carries its statistics (:func:`decision_fields` of a
:class:`~pixelfly_lab.studies.stats.Decision`): the effect (mean paired difference), its
confidence interval, the seeds, and for an undecided claim the seeds that would decide it. A
*family* (one statement tried on several members: two primary layers, two metrics; Holm-corrected)
is one Claim whose ``members`` list each member's verdict and statistics; the report counts it once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from pixelfly_lab.studies.stats import Decision

__all__ = ["CLAIM_KINDS", "HELD", "Claim", "decision_fields", "member", "save_figure", "save_table"]

CLAIM_KINDS = ("paper", "check", "target", "info")
HELD = {"held": True, "refuted": False, "undecided": None}  # a verdict of studies.stats as Claim.held


@dataclass
class Claim:
    """One statement and what this run measured about it.

    Attributes:
        claim: the statement, with its source and its pass rule ("Pixelfly paper, Thm 1: ... held
            when |slope - 2| < 0.05").
        measured: the measured figures, formatted for a reader.
        held: True / False when the run decides it, None for kind 'info', or for a claim this run
            cannot decide, which then says why ("undecided ..." in its text, or ``measured``
            starting "not measured: ...").
        figure: file name (PNG, in the study's folder) that shows it, if any.
        kind: 'paper', 'check', 'target' or 'info' (see the module docstring).
        table: file name (CSV, in the study's folder) with the numbers behind it, if any.
        effect, ci, seeds, seeds_to_decide: the statistics of a comparison (mean paired
            difference, its confidence interval (low, high), seeds, and the seeds at which a true
            difference of this size would be decided with 80% power; None when decided).
        members: a family's members, each {name, verdict, effect, ci, seeds, seeds_to_decide}.

    Example:
        >>> Claim("two is two (check)", "2 == 2", True, kind="check").to_dict()["kind"]
        'check'
    """

    claim: str
    measured: str
    held: bool | None = None
    figure: str | None = None
    kind: str = "paper"
    table: str | None = None
    effect: float | None = None
    ci: tuple | None = None
    seeds: int | None = None
    seeds_to_decide: int | None = None
    members: list = field(default_factory=list)

    def __post_init__(self):
        if self.kind not in CLAIM_KINDS:
            raise ValueError(f"kind must be one of {CLAIM_KINDS}, got {self.kind!r}")
        if self.held is not None:
            self.held = bool(self.held)  # numpy booleans would not survive json.dumps
        if self.kind == "info" and self.held is not None:
            raise ValueError(f"an 'info' claim has no verdict (held=None), got held={self.held}: {self.claim!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _number(value):
    return None if value is None or value != value else float(value)


def decision_fields(decision: Decision) -> dict:
    """Claim fields of a decision: held, effect, ci, seeds, seeds_to_decide (only when undecided)."""
    undecided = decision.verdict == "undecided"
    return dict(held=HELD[decision.verdict], effect=_number(decision.mean),
                ci=None if decision.n < 2 else (_number(decision.low), _number(decision.high)), seeds=decision.n,
                seeds_to_decide=decision.seeds_to_decide() if undecided else None)


def member(name: str, decision: Decision, verdict: str | None = None) -> dict:
    """One member of a family: its name, its (Holm-corrected) verdict and its statistics."""
    fields = decision_fields(decision)
    verdict = verdict or decision.verdict
    return dict(name=name, verdict=verdict, effect=fields["effect"], ci=fields["ci"], seeds=fields["seeds"],
                seeds_to_decide=decision.seeds_to_decide() if verdict == "undecided" else None)


def save_figure(fig, out: Path, name: str) -> str:
    """Write ``fig`` as out/name.png and out/name.pdf, close it, return the PNG's file name."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    fig.savefig(out / f"{name}.pdf", bbox_inches="tight")
    plt.close(fig)
    return f"{name}.png"


def save_table(df, out: Path, name: str) -> str:
    """Write a DataFrame as out/name.csv and return the file name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"{name}.csv", index=False)
    return f"{name}.csv"
