"""ledger.html: the agent loop's progress at a glance. Per metric, each decided experiment's candidate and
baseline (mean over the screening seeds with its 95% interval), kept ones marked; then every entry with its
decision, reason and links to its runs' reports. Rebuilt after every experiment."""

from __future__ import annotations

import os
from html import escape
from pathlib import Path
from typing import Any

from glasslab.experiment import ledger
from glasslab.report.html import table
from glasslab.report.plot import STYLE
from glasslab.report.sections import Section
from glasslab.study.findings import num
from glasslab.study.report import _img, _png
from glasslab.track import layout
from glasslab.track.atomic import write_text_atomic


def progress_figure(entries: list[dict[str, Any]], metric: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context(STYLE):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        for i, e in enumerate(entries):
            arms = e["rounds"][0]["arms"]
            for arm, colour, dx in (("baseline", "0.6", -0.12), ("candidate", "C0", 0.12)):
                s = arms[arm]["summary"]
                if s["mean"] is None:
                    continue
                kept = arm == "candidate" and e["decision"] == "kept"
                ax.errorbar(
                    i + dx,
                    s["mean"],
                    yerr=s["ci95"] or 0.0,
                    fmt="*" if kept else "o",
                    color="C2" if kept else colour,
                    markersize=11 if kept else 5,
                    capsize=3,
                    label=None if i else arm,
                )
        ax.set_xticks(range(len(entries)), [str(i + 1) for i in range(len(entries))])
        ax.set_xlabel("experiment (star: kept)")
        ax.set_ylabel(f"{metric} (mean, 95% CI)")
        ax.legend(loc="best", fontsize=8)
        return _png(fig)


def _links(e: dict[str, Any], root: Path) -> str:
    out = []
    for rnd in e.get("rounds", []):
        for arm, info in rnd["arms"].items():
            for r in info["runs"]:
                report = Path(r["path"]) / layout.REPORT
                href = os.path.relpath(report, root) if report.is_file() else None
                label = f"{arm[0]}{r['seed']}"
                out.append(f'<a href="{escape(href)}">{label}</a>' if href else escape(label))
    return " ".join(out)


def build_ledger_page(root: Path) -> Path:
    from glasslab.report.page import render_page

    root = Path(root)
    entries = ledger.read(ledger.ledger_path(root))
    decided = [e for e in entries if e.get("rounds")]
    sections = []
    for metric in dict.fromkeys(e["metric"] for e in decided):
        mine = [e for e in decided if e["metric"] == metric]
        s = Section(f"metric-{len(sections)}", metric, intro="Screening seeds; the x axis numbers these experiments.")
        s.html(_img(progress_figure(mine, metric), metric))
        sections.append(s)
    rows = []
    for e in entries:
        diff = f"{num(e['difference'])} ± {num(e['ci95'])}" if e.get("ci95") is not None else "-"
        rows.append(
            [
                e["id"],
                e.get("kind", ""),
                e.get("description", ""),
                e["decision"],
                e.get("verdict") or "-",
                diff,
                num(e["p"]) if e.get("p") is not None else "-",
                num(e["noise_floor"]) if e.get("noise_floor") is not None else "-",
                e.get("reason", ""),
            ]
        )
    listing = Section(
        "entries", "Experiments", intro="Difference: candidate - baseline, paired, in the metric's units."
    )
    listing.html(
        table(["id", "kind", "what", "decision", "verdict", "difference ± 95%", "p", "noise floor", "reason"], rows)
    )
    listing.html(
        "<h3>Runs</h3>"
        + "".join(f"<p>{escape(e['id'])}: {_links(e, root)}</p>" for e in decided)
        + "<p class='muted'>b: baseline, c: candidate, then the seed.</p>"
    )
    aa = ledger.aa_rate(entries)
    if aa["checks"]:
        listing.html(f"<p>A/A checks: {aa['false_effects']} of {aa['checks']} called noise an effect.</p>")
    path = root / layout.LEDGER_PAGE
    write_text_atomic(path, render_page("glasslab ledger", [*sections, listing], subtitle=str(root)))
    return path
