"""The study's outputs, all computed from its run directories: report.html (self-contained), findings.md,
summary.json (for scripts and agents), and each figure as a PNG under figures/ for a paper."""

from __future__ import annotations

import base64
import io
import math
import re
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from glasslab.report.html import table
from glasslab.report.plot import STYLE
from glasslab.report.sections import Section
from glasslab.study.aggregate import Cell, RunResult, cells, collect, mean_curve
from glasslab.study.executor import Outcome
from glasslab.study.findings import Finding, compute_findings, num, pm
from glasslab.study.plan import Plan, level_text
from glasslab.track import layout
from glasslab.track.atomic import (
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from glasslab.track.rundir import RunDir


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80]


def _cell_label(levels: dict[str, Any], skip: str | None = None) -> str:
    return ", ".join(f"{k}={level_text(v)}" for k, v in levels.items() if k != skip) or "all runs"


def _axis(levels: list[Any]) -> str:
    """How a factor's levels sit on an x axis: 'log' (positive, spanning 10x or more), 'linear' (roughly evenly
    spaced numbers), else 'index' (categories, or numbers like 0, 1e-4, 1e-3 that neither scale shows)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in levels) or len(levels) < 2:
        return "index"
    values = sorted(float(v) for v in levels)
    if values[0] > 0 and values[-1] / values[0] >= 10:
        return "log"
    gaps = np.diff(values)
    return "linear" if gaps.min() > 0 and gaps.max() / gaps.min() <= 5 else "index"


def effect_figure(plan: Plan, all_cells: list[Cell], metric: str, factor: str, cap: float | None) -> bytes:
    """Mean ± 95% interval of `metric` at each level of `factor`, one line per setting of the other factors.
    Settings whose runs all failed are marked with x at the top (at ln V when that cap applies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = plan.levels(factor)
    scale = _axis(levels)
    xs = {lv: (float(lv) if scale != "index" else i) for i, lv in enumerate(levels)}
    groups: dict[str, list[Cell]] = {}
    for c in all_cells:
        groups.setdefault(_cell_label(c.levels, skip=factor), []).append(c)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        failed_x: list[tuple[float, str]] = []
        for i, (label, group) in enumerate(groups.items()):
            pts = sorted((xs[c.levels[factor]], c.summary(metric), c) for c in group)
            x = [p[0] for p in pts if p[1].n]
            y = [p[1].mean for p in pts if p[1].n]
            err = [0.0 if not math.isfinite(p[1].ci95) else p[1].ci95 for p in pts if p[1].n]
            colour = plt.get_cmap("tab10")(i % 10)
            ax.errorbar(x, y, yerr=err, marker="o", markersize=4, capsize=3, color=colour, label=label)
            failed_x += [(p[0], colour) for p in pts if p[1].n == 0 and p[2].failed]
        if failed_x:
            top = cap if cap is not None else ax.get_ylim()[1]
            for x, colour in failed_x:
                ax.plot([x], [top], marker="x", markersize=8, color=colour, linestyle="none")
            ax.annotate(
                "x: all runs failed" + (" (plotted at ln V)" if cap is not None else ""),
                xy=(0.01, 0.99),
                xycoords="axes fraction",
                va="top",
                fontsize=7,
            )
        if scale == "log":
            ax.set_xscale("log")
        ax.set_xticks([xs[v] for v in levels], [level_text(v) for v in levels])
        ax.minorticks_off()
        ax.set_xlabel(factor)
        ax.set_ylabel(metric)
        if len(groups) > 1:
            ax.legend()
        return _png(fig)


CURVE_POINTS = 40  # a longer study curve is smoothed over windows of 1/CURVE_POINTS of its length


def curve_figure(all_cells: list[Cell], name: str) -> bytes | None:
    """One line per setting (mean over seeds) with its 95% band. A curve of more than CURVE_POINTS logged points
    is a trailing mean over windows of 1/CURVE_POINTS of it (the axis says how many steps). A metric spanning
    more than two orders of magnitude gets a log axis, where a band is drawn only where its lower edge stays
    above zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [len(r.curves[name].steps) for c in all_cells for r in c.runs if r.completed and name in r.curves]
    smooth = max(1, min(lengths, default=0) // CURVE_POINTS)
    curves = [(c, curve) for c in all_cells if (curve := mean_curve(c.runs, name, smooth)) is not None]
    if not curves:
        return None
    means = np.concatenate([mean for _, (_, mean, _) in curves])
    log = bool(np.nanmin(means) > 0 and np.nanmax(means) / np.nanmin(means) > 100)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        cmap = plt.get_cmap("tab10" if len(curves) <= 10 else "viridis")
        for i, (c, (steps, mean, ci)) in enumerate(curves):
            colour = cmap(i % 10) if len(curves) <= 10 else cmap(i / (len(curves) - 1))
            ax.plot(steps, mean, color=colour, label=_cell_label(c.levels))
            band = np.isfinite(ci) & ((mean - ci > 0) if log else True)
            if band.any():
                ax.fill_between(steps, mean - ci, mean + ci, where=band, color=colour, alpha=0.15, linewidth=0)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(name if smooth == 1 else f"{name} (mean of {smooth} logged steps)")
        if len(curves) > 6:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            ax.legend(fontsize=7)
        return _png(fig)


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img class="plot" alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def build_study_report(
    plan: Plan, study_dir: Path, outcomes: list[Outcome] | None = None, wall_time_s: float | None = None
) -> dict[str, Any]:
    """Write report.html, findings.md, summary.json and figures/*.png into the study directory; returns the summary."""
    from glasslab.report.page import render_page

    spec = plan.spec
    results = collect(plan, study_dir / layout.STUDY_RUNS)
    all_cells = cells(results)
    findings = compute_findings(plan, results)
    vocab = next((r.vocab_size for r in results if r.vocab_size), None)
    figures_dir = study_dir / layout.STUDY_FIGURES
    figures_dir.mkdir(parents=True, exist_ok=True)
    figure_files: list[str] = []

    def save(png: bytes, name: str) -> str:
        path = figures_dir / f"{name}.png"
        write_bytes_atomic(path, png)
        figure_files.append(str(path))
        return _img(png, name)

    head = Section("study", f"Study {spec.name}", intro=spec.description)
    done = sum(r.completed for r in results)
    head.html(
        table(
            [
                "preset",
                "stages",
                "shared stages (base run)",
                "seeds",
                "scale",
                "runs",
                "completed",
                "this invocation (s)",
            ],
            [
                (
                    spec.preset,
                    ", ".join(spec.stages),
                    ", ".join(spec.shared_stages) or "none",
                    ", ".join(map(str, plan.seeds)),
                    plan.scale,
                    len(results),
                    done,
                    wall_time_s,
                )
            ],
        )
    )
    if spec.factors:
        head.html(
            "<h3>Factors</h3>"
            + table(
                ["factor", "config key", "levels"],
                [(f.name, f.key, ", ".join(level_text(v) for v in plan.levels(f.name))) for f in spec.factors],
            )
        )
    sections = [head, _findings_section(findings)]
    effects = Section(
        "effects",
        "Effects",
        intro="Mean over seeds with 95% t-intervals, at each level of a factor; "
        "one line per setting of the other factors.",
    )
    sens = spec.sensitivity
    for m in spec.metrics:
        for f in spec.factors:
            if len(plan.levels(f.name)) < 2:
                continue
            is_sens = sens is not None and sens.factor == f.name and sens.metric == m.title
            png = effect_figure(plan, all_cells, m.title, f.name, math.log(vocab) if is_sens and vocab else None)
            title = f"{'Sensitivity: ' if is_sens else ''}{m.title} by {f.name}"
            effects.html(f"<h3>{escape(title)}</h3>" + save(png, f"{_slug(m.title)}-by-{_slug(f.name)}"))
    if effects.items:
        sections.append(effects)
    if spec.curves:
        curves = Section("curves", "Curves", intro=f"Mean over seeds (band: 95% t-interval) during {spec.stages[-1]}.")
        for name in spec.curves:
            png = curve_figure(all_cells, name)
            if png is not None:
                curves.html(f"<h3>{escape(name)}</h3>" + save(png, f"curve-{_slug(name)}"))
            else:
                curves.html(f"<p class='muted'>{escape(name)}: not logged by any completed run.</p>")
        sections.append(curves)
    sections.append(_values_section(spec, all_cells))
    sections.append(_runs_section(results, outcomes, study_dir))
    write_text_atomic(
        study_dir / layout.STUDY_REPORT, render_page(f"glasslab study: {spec.name}", sections, subtitle=str(study_dir))
    )
    summary = _summary(plan, study_dir, results, all_cells, findings, outcomes, wall_time_s, figure_files)
    write_json_atomic(study_dir / layout.STUDY_SUMMARY, summary)
    write_text_atomic(study_dir / layout.STUDY_FINDINGS, findings_markdown(plan, results, all_cells, findings))
    return summary


def _grouped(findings: list[Finding]) -> dict[str, list[Finding]]:
    """Sensitivity first, then one group per metric (each already ordered: significant first)."""
    groups: dict[str, list[Finding]] = {}
    for f in findings:
        groups.setdefault(f"Sensitivity to {f.factor}" if f.kind == "sensitivity" else f.metric, []).append(f)
    return groups


def _findings_section(findings: list[Finding]) -> Section:
    sec = Section(
        "findings",
        "Findings",
        intro="Computed from the runs: mean ± 95% interval over seeds; differences "
        "tested with Welch's t-test (significant: p < 0.05, in bold).",
    )
    if not findings:
        sec.html("<p>No factor has two levels to compare.</p>")
    for title, group in _grouped(findings).items():
        items = "".join(
            f'<li class="{"sig" if f.significant else "muted" if f.kind == "missing" else ""}">{escape(f.text)}</li>'
            for f in group
        )
        sec.html(f"<h3>{escape(title)}</h3><ul>{items}</ul>")
    return sec


def _values_section(spec: Any, all_cells: list[Cell]) -> Section:
    sec = Section(
        "values", "Values per setting", intro="Each metric per setting: mean ± 95% interval, and every seed's value."
    )
    for m in spec.metrics:
        rows = []
        for c in all_cells:
            s = c.summary(m.title)
            rows.append(
                (
                    _cell_label(c.levels),
                    pm(s),
                    s.n,
                    c.failed,
                    ", ".join(num(v, 4) if v is not None else "—" for v in c.values(m.title)),
                )
            )
        sec.html(f"<h3>{escape(m.title)}</h3>" + table(["setting", "mean ± 95% CI", "n", "failed", "per seed"], rows))
    return sec


def _runs_section(results: list[RunResult], outcomes: list[Outcome] | None, study_dir: Path) -> Section:
    sec = Section("runs", "Runs", intro="Every run of the study; each links to its own report.")
    action = {o.name: o.action for o in outcomes or []}
    rows = []
    for r in results:
        report = RunDir(r.path).report_path
        link = (
            f'<a href="{escape(str(report.relative_to(study_dir)))}">{escape(r.name)}</a>'
            if report.exists()
            else escape(r.name)
        )
        wall = "" if r.wall_time_s is None else f"{r.wall_time_s:.0f}"
        rows.append(
            f"<tr><td>{link}</td><td>{escape(r.status)}</td><td>{r.seed}</td><td>{escape(action.get(r.name, ''))}</td>"
            f"<td>{wall}</td><td>{escape(r.message or '')}</td></tr>"
        )
    sec.html(
        "<table><thead><tr><th>run</th><th>status</th><th>seed</th><th>this invocation</th><th>wall time (s)</th>"
        f"<th>message</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )
    return sec


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _summary(
    plan: Plan,
    study_dir: Path,
    results: list[RunResult],
    all_cells: list[Cell],
    findings: list[Finding],
    outcomes: list[Outcome] | None,
    wall_time_s: float | None,
    figure_files: list[str],
) -> dict[str, Any]:
    titles = [m.title for m in plan.spec.metrics]
    return _clean(
        {
            "study": plan.spec.name,
            "dir": str(study_dir),
            "report": str(study_dir / layout.STUDY_REPORT),
            "spec": plan.spec.model_dump(),
            "scale": plan.scale,
            "seeds": plan.seeds,
            "wall_time_s": wall_time_s,
            "runs": [
                {
                    "name": r.name,
                    "path": str(r.path),
                    "seed": r.seed,
                    "levels": r.levels,
                    "status": r.status,
                    "message": r.message,
                    "wall_time_s": r.wall_time_s,
                    "values": r.values,
                }
                for r in results
            ],
            "cells": [
                {
                    "levels": c.levels,
                    "failed": c.failed,
                    "metrics": {t: {**c.summary(t).as_dict(), "values": c.values(t)} for t in titles},
                }
                for c in all_cells
            ],
            "findings": [f.as_dict() for f in findings],
            "executed": [
                {"name": o.name, "action": o.action, "returncode": o.returncode, "seconds": o.seconds}
                for o in outcomes or []
            ],
            "figures": figure_files,
        }
    )


def findings_markdown(plan: Plan, results: list[RunResult], all_cells: list[Cell], findings: list[Finding]) -> str:
    spec = plan.spec
    done = sum(r.completed for r in results)
    lines = [f"# Study: {spec.name}", ""]
    if spec.description:
        lines += [spec.description, ""]
    lines += [
        f"Preset `{spec.preset}`, stages {', '.join(spec.stages)}"
        + (f" (shared base: {', '.join(spec.shared_stages)})" if spec.shared_stages else "")
        + f", seeds {', '.join(map(str, plan.seeds))}, scale {plan.scale:g}; {done} of {len(results)} runs completed.",
        "",
        "Values are mean ± 95% t-interval over seeds; differences tested with Welch's t-test (significant: p < 0.05).",
        "",
        "## Findings",
        "",
    ]
    for title, group in _grouped(findings).items():
        lines += (
            [f"### {title}", ""]
            + [f"- {'**' if f.significant else ''}{f.text}{'**' if f.significant else ''}" for f in group]
            + [""]
        )
    if not findings:
        lines.append("- (no factor has two levels to compare)")
    lines += ["## Values per setting", ""]
    for m in spec.metrics:
        lines += [f"### {m.title}", "", "| setting | mean ± 95% CI | n | failed |", "|---|---|---|---|"]
        lines += [
            f"| {_cell_label(c.levels)} | {pm(c.summary(m.title))} | {c.summary(m.title).n} | {c.failed} |"
            for c in all_cells
        ]
        lines.append("")
    return "\n".join(lines)
