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
:func:`family_claim` does a family's bookkeeping once (Holm, the seeds that would decide each
undecided member, the Claim's fields), with or without a headline member declared in advance.

One wording of the verdicts everywhere (:func:`verdict_word`): the report, ``claims_table`` and the
notebooks say "held", "did not hold", "undecided", "reading", "target met", "target missed",
"target not measured".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pixelfly_lab.studies.stats import Decision, family_verdicts

__all__ = ["CLAIM_KINDS", "HELD", "VERDICT_WORDS", "Claim", "Family", "decision_fields", "family_claim", "member",
           "save_figure", "save_table", "verdict_word"]

CLAIM_KINDS = ("paper", "check", "target", "info")
HELD = {"held": True, "refuted": False, "undecided": None}  # a verdict of studies.stats as Claim.held
# How a claim's verdict reads, in the report, in verdicts.claims_table and in the notebooks (one wording):
# a paper claim or check is held / did not hold / undecided; an 'info' claim is a reading; a 'target' (the
# toolkit's own speed targets) is met, missed or not measured.
VERDICT_WORDS = ("held", "did not hold", "undecided", "reading", "target met", "target missed", "target not measured")


def verdict_word(claim: dict) -> str:
    """The verdict of a claim (a :meth:`Claim.to_dict`) in the words of :data:`VERDICT_WORDS`.

    Example:
        >>> verdict_word({"kind": "paper", "held": False}), verdict_word({"kind": "target", "held": None})
        ('did not hold', 'target not measured')
    """
    held, kind = claim.get("held"), claim.get("kind", "paper")
    if kind == "info":
        return "reading"
    if kind == "target":
        return {True: "target met", False: "target missed", None: "target not measured"}[held]
    if held is None:
        return "undecided"
    return "held" if held else "did not hold"


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
    return dict(held=HELD[decision.verdict], **_statistics(decision),
                seeds_to_decide=decision.seeds_to_decide() if undecided else None)


def member(name: str, decision: Decision, verdict: str | None = None) -> dict:
    """One member of a family: its name, its (Holm-corrected) verdict and its statistics."""
    verdict = verdict or decision.verdict
    return dict(name=name, verdict=verdict, **_statistics(decision),
                seeds_to_decide=decision.seeds_to_decide() if verdict == "undecided" else None)


@dataclass(frozen=True)
class Family:
    """One statement tried on several members, decided once: see :func:`family_claim`.

    Attributes:
        verdict: the family's verdict ('held', 'refuted', 'undecided').
        names: the members' names, in order; the headline first when there is one.
        decisions: their :class:`~pixelfly_lab.studies.stats.Decision`\\ s, each marked as sharing alpha with
            the tests of its Holm family (:meth:`Decision.shared`).
        verdicts: their (Holm-corrected) verdicts.
        to_decide: for each undecided member the seeds that would decide it (computed once), else None.
        headline: the headline member's name, or None (then every member is primary).
        lead: index of the member whose statistics stand for the family (the headline, or the one
            nearest to being held).
    """

    verdict: str
    names: tuple
    decisions: tuple
    verdicts: tuple
    to_decide: tuple
    headline: str | None
    lead: int

    def members(self) -> list[dict]:
        """The Claim's ``members``: {name, verdict, effect, ci, seeds, seeds_to_decide} each."""
        rows = []
        for name, decision, verdict, to_decide in zip(self.names, self.decisions, self.verdicts, self.to_decide):
            fields = _statistics(decision)
            rows.append(dict(name=name, verdict=verdict, **fields, seeds_to_decide=to_decide))
        return rows

    def fields(self, verdict: str | None = None, *, more_seeds_decide: bool = True) -> dict:
        """The Claim's fields: held, effect, ci, seeds, seeds_to_decide (the lead member's, else the largest left) and members.

        Args:
            verdict: the claim's verdict when a rule beyond the statistics overrides the family's
                (e.g. controls that did not behave); default the family's.
            more_seeds_decide: False when the claim is undecided for a reason seeds cannot fix
                (then no seed count is printed).
        """
        verdict = verdict or self.verdict
        to_decide = None
        if verdict == "undecided" and more_seeds_decide:   # the lead's count, else the largest a member still needs
            to_decide = self.to_decide[self.lead] or max((n for n in self.to_decide if n), default=None)
        return dict(held=HELD[verdict], **_statistics(self.decisions[self.lead]), seeds_to_decide=to_decide,
                    members=self.members())

    def describe(self, digits: int = 3) -> str:
        """'name: verdict +0.01 [...] (90% t interval, 3 seeds), ~9 seeds would decide; ...' per member."""
        return "; ".join(
            f"{name}{' (headline)' if name == self.headline else ''}: {verdict} {d.describe(digits)}"
            + (f", ~{n} seeds would decide" if n else "")
            for name, d, verdict, n in zip(self.names, self.decisions, self.verdicts, self.to_decide))


def _statistics(decision: Decision) -> dict:
    return dict(effect=_number(decision.mean),
                ci=None if decision.n < 2 else (_number(decision.low), _number(decision.high)), seeds=decision.n)


def family_claim(decisions: dict, *, headline: str | None = None, alpha: float | None = None) -> Family:
    """A family of comparisons decided once: Holm, the verdicts, the seeds that would decide, the Claim's fields.

    Without a headline every member is primary: Holm across all of them
    (:func:`~pixelfly_lab.studies.stats.family_verdicts`); the family is held when a member is held,
    refuted when every member is. With a ``headline`` (the claim's text says whether it was named before
    measuring), the family's
    verdict is the headline member's own (at level alpha, no correction: it is the one test of the
    claim) and the other members are secondary readings, Holm-corrected among themselves.

    Args:
        decisions: {member name: :class:`~pixelfly_lab.studies.stats.Decision`} (at least one).
        headline: the name of the headline member, or None.
        alpha: the family-wise level (default: the members' own).

    Returns:
        :class:`Family`; ``Claim(text, measured, **family.fields(), ...)`` makes its Claim.

    Example:
        >>> from pixelfly_lab.studies.stats import paired_decision
        >>> f = family_claim({"a": paired_decision([1.0, 1.1, 0.9]), "b": paired_decision([-1.0, 0.2, 1.0])},
        ...                  headline="a")
        >>> f.verdict, f.verdicts
        ('held', ('held', 'undecided'))
    """
    if not isinstance(decisions, dict) or not decisions:
        raise ValueError("decisions must be a non-empty dict {member name: Decision}")
    if headline is not None and headline not in decisions:
        raise ValueError(f"headline must be one of {list(decisions)}, got {headline!r}")
    names = ([headline] if headline is not None else []) + [n for n in decisions if n != headline]
    if headline is None:
        verdict, verdicts = family_verdicts(list(decisions.values()), alpha)
        shared = [decisions[n].shared(len(names)) for n in names]
    else:
        head = decisions[headline]
        head = head if alpha is None else replace(head, alpha=alpha)
        verdict = "held" if head.p_held < head.alpha else "refuted" if head.p_refuted < head.alpha else "undecided"
        others = [decisions[n] for n in names[1:]]
        verdicts = [verdict] + (family_verdicts(others, alpha)[1] if others else [])
        shared = [head] + [d.shared(len(others)) for d in others]
    to_decide = tuple(d.seeds_to_decide() if v == "undecided" else None for d, v in zip(shared, verdicts))
    lead = 0 if headline is not None else min(range(len(names)), key=lambda i: shared[i].p_held)
    return Family(verdict, tuple(names), tuple(shared), tuple(verdicts), to_decide, headline, lead)


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
