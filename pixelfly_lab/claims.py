"""What an experiment hands to the report: claims checked, and its figures and tables on disk.

Every experiment of ``python -m pixelfly_lab reproduce`` is a function

    experiment(out: pathlib.Path, *, quick: bool, device: str) -> list[Claim]

that writes its figures (PNG and PDF, via :func:`save_figure`) and tables (CSV, via
:func:`save_table`) into ``out`` and returns the paper's claims it checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Claim", "save_figure", "save_table"]


@dataclass
class Claim:
    """One claim of the paper (or of the maths) and what this run measured.

    Attributes:
        claim: the statement checked, with its source ("Pixelfly paper, Thm 1: ...").
        measured: the measured figures, formatted for a reader.
        held: True / False when the run decides it, None when it only informs.
        figure: file name (PNG, in the experiment folder) that shows it, if any.
    """

    claim: str
    measured: str
    held: bool | None = None
    figure: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


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
