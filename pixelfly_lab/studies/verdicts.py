"""The report's verdicts as data, and one study's claims and figures shown once each, for notebooks.

``python -m pixelfly_lab reproduce`` writes ``OUT/<study>/claims.json`` (see
:mod:`pixelfly_lab.studies.reproduce`). :func:`claims_table` reads every study's claims into one
DataFrame with the verdict spelled as the report spells it; :func:`show_study` displays one study's
claims as a table and each of its figures once (several claims often share one figure).

Example:
    >>> table = claims_table("results")                       # doctest: +SKIP
    >>> table[table.kind == "paper"].verdict.value_counts()   # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pixelfly_lab.studies.claims import VERDICT_WORDS, verdict_word
from pixelfly_lab.studies import reproduce   # read reproduce.EXPERIMENTS at call time, never a copy

__all__ = ["VERDICTS", "claims_table", "study_figures", "show_study"]

# How a claim's ``held`` reads: one wording, shared with the report (claims.verdict_word).
VERDICTS = VERDICT_WORDS
_KIND_WORDS = {"check": "checks", "info": "readings", "target": "speed targets", "paper": "paper claims"}


def claims_table(out="results") -> pd.DataFrame:
    """Every claim of every study found under ``out``, one row each, in report order.

    Args:
        out: the folder ``reproduce`` wrote (``results`` by default).

    Returns:
        DataFrame with columns study, preset, kind ('paper', 'check', 'target', 'info'), verdict (one of
        :data:`VERDICTS`), claim, measured, figure (file name or None); empty (same columns) when
        ``out`` holds no results.
    """
    if not isinstance(out, (str, Path)):
        raise TypeError(f"out must be a path, got {type(out).__name__}")
    rows = []
    for name, record in reproduce.load_results(out).items():
        for claim in record.get("claims", []):
            rows.append({"study": name, "preset": record.get("preset"), "kind": claim.get("kind", "paper"),
                         "verdict": verdict_word(claim), "claim": claim["claim"], "measured": claim["measured"],
                         "figure": claim.get("figure")})
    columns = ["study", "preset", "kind", "verdict", "claim", "measured", "figure"]
    return pd.DataFrame(rows, columns=columns)


def study_figures(out, name: str) -> list[Path]:
    """The PNG figures of study ``name`` that its claims cite, each once, in claim order.

    Args:
        out: the results folder.
        name: a study name (one of ``reproduce.EXPERIMENTS``).

    Returns:
        List of existing file paths (empty when the study has no results).
    """
    names = [e.name for e in reproduce.EXPERIMENTS]
    if name not in names:
        raise ValueError(f"name must be one of {names}, got {name!r}")
    table = claims_table(out)
    figures = table[(table.study == name) & table.figure.notna()].figure
    paths = [Path(out) / name / f for f in dict.fromkeys(figures)]
    return [p for p in paths if p.exists()]


def show_study(out, name: str, width: int = 900) -> pd.DataFrame:
    """Display one study's claims (verdict, claim, measured), each of its figures once, and its verdicts counted.

    Args:
        out: the results folder.
        name: a study name.
        width: displayed figure width in pixels (figures wider than this are shrunk by an integer factor before embedding,
            so an executed notebook stays small).

    Returns:
        The study's rows of :func:`claims_table` (empty when it has no results).
    """
    from IPython.display import Image, Markdown, display

    if not isinstance(width, int) or isinstance(width, bool) or width < 100:
        raise ValueError(f"width must be an int >= 100 (pixels), got {width!r}")
    table = claims_table(out)
    rows = table[table.study == name] if name in {e.name for e in reproduce.EXPERIMENTS} else None
    if rows is None:
        raise ValueError(f"name must be one of {[e.name for e in reproduce.EXPERIMENTS]}, got {name!r}")
    if rows.empty:
        display(Markdown(f"*`{name}` has no results in `{out}`: run `make reproduce` "
                         f"(or `python -m pixelfly_lab reproduce --preset quick --only {name}`).*"))
        return rows
    lines = ["| verdict | kind | claim | measured |", "|---|---|---|---|"]
    for row in rows.itertuples():
        cells = [f"**{row.verdict}**", row.kind, row.claim, row.measured]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    display(Markdown("\n".join(lines)))
    for path in study_figures(out, name):
        display(Image(data=_shrunk_png(path, width)))
    tally = rows[rows.kind == "paper"].verdict.value_counts()
    display(Markdown(f"*The `{name}` study's paper claims in this run: {tally.get('held', 0)} held, "
                     f"{tally.get('did not hold', 0)} did not hold, {tally.get('undecided', 0)} undecided.*"
                     if tally.sum() else f"*The `{name}` study has no paper claims in this run, only "
                     f"{', '.join(dict.fromkeys(_KIND_WORDS.get(k, k) for k in rows.kind))}.*"))
    return rows


def _shrunk_png(path: Path, width: int) -> bytes:
    """The PNG's bytes, shrunk by an integer factor (block means) to at most ``width`` pixels wide."""
    import matplotlib.image

    image = matplotlib.image.imread(path)  # (height, width, channels) floats in [0, 1]
    factor = math.ceil(image.shape[1] / width)
    if factor <= 1:
        return path.read_bytes()
    height, wide = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:height, :wide].reshape(height // factor, factor, wide // factor, factor, -1)
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, np.clip(blocks.mean(axis=(1, 3)), 0, 1), format="png")
    return buffer.getvalue()
