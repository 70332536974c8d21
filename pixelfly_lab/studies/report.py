"""The reproduction report: ``report.md`` and ``report.html`` from the studies' records.

:func:`write_report` lists the paper's distinct claims first (a family counts once, its members
listed; the verdicts in the words of :func:`pixelfly_lab.studies.claims.verdict_word`), the
toolkit's speed targets in their own section, then each study's figures beside its claims,
checks and readings. :func:`tally` is the one count of held / refuted / undecided claims that the
report's summary and the command's last line both read. The runner that calls them is
:mod:`pixelfly_lab.studies.reproduce`.
"""

from __future__ import annotations

import html
from pathlib import Path

from pixelfly_lab.studies.claims import HELD, verdict_word

__all__ = ["tally", "write_report"]


def _kind_label(kind: str) -> str:
    return {"paper": "Paper claim", "check": "Check", "target": "Speed target", "info": "Reading"}.get(kind, kind)


def _statistics(claim: dict) -> str:
    """'effect +0.012, CI [-0.003, +0.027], 3 seeds; ~9 seeds would decide it' (empty without statistics)."""
    parts = []
    if claim.get("effect") is not None:
        parts.append(f"effect {claim['effect']:+.3g}")
    if claim.get("ci"):
        parts.append(f"CI [{claim['ci'][0]:+.3g}, {claim['ci'][1]:+.3g}]")
    if claim.get("seeds") is not None:
        parts.append(f"{claim['seeds']} seed(s)")
    text = ", ".join(parts)
    if claim.get("held") is None and claim.get("kind") == "paper":
        if claim.get("seeds_to_decide"):
            text += f"; ~{claim['seeds_to_decide']} seeds would decide it (80% power at this effect and sd)"
        elif claim.get("seeds") is not None and claim.get("effect") is not None:
            text += "; no number of seeds decides it at this effect (on the margin) or the rule needs more than seeds"
    return text


def _members(claim: dict) -> list[str]:
    lines = []
    for m in claim.get("members") or []:
        as_claim = {**m, "kind": "paper", "held": HELD.get(m["verdict"])}
        lines.append(f"{m['name']}: {verdict_word(as_claim)}"
                     + (f" ({_statistics(as_claim)})" if m.get("effect") is not None else ""))
    return lines


def tally(records: dict[str, dict]) -> dict:
    """The report's counts, written once (the report's summary and the command's last line read them).

    Args:
        records: {study name: record} as :func:`reproduce` returns them.

    Returns:
        dict: paper ([(study, claim)] of kind 'paper': a family is one claim), held, refuted, undecided,
        families, unmeasured (undecided because not measured here, e.g. GPU claims), checks, checks_held,
        targets ([(study, claim)]), met, failed (study names).
    """
    def of(kind):
        return [(name, c) for name, rec in records.items() for c in rec.get("claims", [])
                if c.get("kind", "paper") == kind]

    paper, checks, targets = of("paper"), of("check"), of("target")
    held = sum(1 for _, c in paper if c.get("held") is True)
    refuted = sum(1 for _, c in paper if c.get("held") is False)
    return dict(paper=paper, held=held, refuted=refuted, undecided=len(paper) - held - refuted,
                families=sum(1 for _, c in paper if c.get("members")),
                unmeasured=sum(1 for _, c in paper if c.get("held") is None
                               and c["measured"].startswith("not measured")),
                checks=checks, checks_held=sum(1 for _, c in checks if c.get("held") is True), targets=targets,
                met=sum(1 for _, c in targets if c.get("held") is True),
                failed=[name for name, rec in records.items() if rec["status"] == "failed"])


def write_report(out: Path, records: dict[str, dict], env: dict, preset: str, *, titles: dict[str, str],
                 time_line: str) -> None:
    """Write report.md and report.html (atomically) from the studies' records.

    Args:
        out: the results folder.
        records: {study name: record}, in report order.
        env: the environment line's fields.
        preset: this run's preset.
        titles: {study name: title}, the section heads.
        time_line: the sentence on how long the full preset takes (reproduce.full_time).
    """
    env_text = ", ".join(f"{k} {v}" for k, v in env.items())
    presets = sorted({rec.get("preset", "?") for rec in records.values()})
    count = tally(records)
    paper, targets, failed = count["paper"], count["targets"], count["failed"]
    held, refuted, families, unmeasured = count["held"], count["refuted"], count["families"], count["unmeasured"]
    checks, checks_held, met = count["checks"], count["checks_held"], count["met"]
    intro = [f"Preset of this run: `{preset}`" + (f" (results on this page come from presets {', '.join(presets)})"
                                                  if presets != [preset] else "") + f", jobs {env.get('jobs', 1)}"
             + (" (worker processes of one thread; the timed studies alone)" if env.get("jobs", 1) > 1 else "") + ".",
             "Seeds are fixed in each study's config (shown under each study); a rerun with the same preset "
             "repeats the same measurements up to timing noise.",
             "Each claim states its source, its condition and its pass rule in its own text, in the code of "
             "this commit; rules and sizes were set with earlier results in view, and a claim whose headline or "
             "regime was chosen after seeing results says so in its text (not pre-registered). Comparisons are "
             "paired by seed and decided by a 90% t interval of the mean difference (pixelfly_lab.studies.stats): "
             "held or refuted when it lies beyond the margin, otherwise undecided, with the seeds that "
             "would decide it; families are Holm-corrected and counted once.",
             f"**Summary: {len(paper)} distinct paper claims ({families} of them families, members listed): {held} "
             f"held, {refuted} did not hold, {count['undecided']} undecided ({unmeasured} of them not measured "
             f"on this machine, e.g. GPU claims on a CPU); {checks_held} of {len(checks)} "
             f"checks held; {met} of {len(targets)} speed targets met (not paper claims: see their section)"
             + (f"; failed studies: {', '.join(failed)}" if failed else "") + ".**",
             time_line,
             "", f"Environment: {env_text}"]
    md = ["# pixelfly_lab reproduction report", "", *intro, "",
          "## Paper claims", ""]
    body = ["<h1>pixelfly_lab reproduction report</h1>"]
    body += [f"<p>{html.escape(line).replace('**', '')}</p>" for line in intro if line]
    body.append("<h2>Paper claims</h2><ul>")
    for name, claim in paper:
        stats = _statistics(claim)
        md += [f"- **{verdict_word(claim)}** ({name}): {claim['claim']}", f"  - measured: {claim['measured']}"]
        md += [f"  - statistics: {stats}"] if stats else []
        md += [f"  - member {m}" for m in _members(claim)]
        body.append(f"<li><b>{verdict_word(claim)}</b> ({html.escape(name)}): {html.escape(claim['claim'])}<br>"
                    f"measured: {html.escape(claim['measured'])}"
                    + (f"<br>statistics: {html.escape(stats)}" if stats else "")
                    + "".join(f"<br>member {html.escape(m)}" for m in _members(claim)) + "</li>")
    if not paper:
        md.append("(no paper claims in these results)")
    md.append("")
    body.append("</ul>")
    if targets:
        md += ["## Speed targets of the toolkit", "",
               "Not claims of the paper: the toolkit's own targets, measured on this machine with its load and its "
               "dense GEMM rate (in each measurement); a loaded machine misses them.", ""]
        body.append("<h2>Speed targets of the toolkit</h2><ul>")
        for name, claim in targets:
            md += [f"- **{verdict_word(claim)}** ({name}): {claim['claim']}", f"  - measured: {claim['measured']}"]
            body.append(f"<li><b>{verdict_word(claim)}</b> ({html.escape(name)}): {html.escape(claim['claim'])}<br>"
                        f"measured: {html.escape(claim['measured'])}</li>")
        md.append("")
        body.append("</ul>")
    for name, rec in records.items():
        head = (f"{titles.get(name, name)} (`{name}`): {rec['status']}, {rec.get('seconds', 0)} s, "
                f"preset {rec.get('preset', '?')}")
        md += [f"## {head}", ""]
        body.append(f"<h2>{html.escape(head)}</h2>")
        if rec.get("config"):
            config = ", ".join(f"{k}={v}" for k, v in rec["config"].items())
            md += [f"Config: `{config}`", ""]
            body.append(f"<p>Config: <code>{html.escape(config)}</code></p>")
        if rec.get("error"):
            md += [f"**Failed:** `{rec['error']}`", ""]
            body.append(f"<p><b>Failed:</b> <code>{html.escape(rec['error'])}</code></p>")
        for claim in rec.get("claims", []):
            label, verdict = _kind_label(claim.get("kind", "paper")), verdict_word(claim)
            stats = _statistics(claim)
            md += [f"- **{label}:** {claim['claim']}", f"  - measured: {claim['measured']}",
                   f"  - verdict: {verdict}" + (f" ({stats})" if stats else "")]
            body.append(f"<p><b>{label}:</b> {html.escape(claim['claim'])}<br>measured: "
                        f"{html.escape(claim['measured'])}<br>verdict: <b>{verdict}</b>"
                        + (f" ({html.escape(stats)})" if stats else "") + "</p>")
            if claim.get("figure"):
                caption = f"{claim['figure']} (preset {rec.get('preset', '?')})"
                md += ["", f"  ![{caption}]({name}/{claim['figure']})", f"  *Figure made by preset "
                       f"`{rec.get('preset', '?')}`.*"]
                body.append(f'<figure><img src="{name}/{html.escape(claim["figure"])}" style="max-width:900px">'
                            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        md.append("")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>pixelfly_lab report</title>"
            "</head><body style='font-family:sans-serif;max-width:960px;margin:auto'>"
            + "\n".join(body) + "</body></html>")
    for file, text in (("report.md", "\n".join(md)), ("report.html", page)):
        tmp = out / f".{file}.tmp"
        tmp.write_text(text)
        tmp.replace(out / file)
