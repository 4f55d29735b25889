"""Several runs on one page: curves overlaid (by step or by tokens seen), the config keys that differ,
and a table of final values. `compare_summary` is the same content as JSON, for scripts and agents."""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import numpy as np

from glasslab.errors import GlasslabError
from glasslab.report import figures
from glasslab.report.html import table
from glasslab.report.rundata import RunData, load_run
from glasslab.report.sections import Section
from glasslab.track.atomic import write_text_atomic
from glasslab.track.layout import LOSS_BY_POS, LOSS_BY_POS_CI95, family_of

Align = Literal["step", "tokens"]


def run_labels(runs: list[RunData]) -> list[str]:
    """Directory names, or parent/name where two runs share a name."""
    names = [r.name for r in runs]
    labels = [f"{r.path.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]
    return [f"{label} ({i})" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(runs: list[RunData], labels: list[str]) -> dict[str, dict[str, Any]]:
    """Dotted config keys whose values differ between runs (a key a run lacks counts as None)."""
    flat = [_flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat), key=figures.natural_key)
    return {
        k: {label: f.get(k) for label, f in zip(labels, flat)} for k in keys if len({repr(f.get(k)) for f in flat}) > 1
    }


def headline_names(runs: list[RunData], pattern: str | None) -> list[str]:
    """Metrics to overlay: those matching `pattern`, else every run-level metric (per-block, per-head and
    per-position families have their own pages and would bury the rest)."""
    names = set().union(*(r.names() for r in runs))
    if pattern:
        picked = [n for n in names if fnmatchcase(n, pattern)]
        if not picked:
            raise GlasslabError(f"no metric matches '{pattern}': try one of {', '.join(sorted(names)[:8])}, ...")
    else:
        picked = [n for n in names if "blocks." not in n and family_of(n) not in (LOSS_BY_POS, LOSS_BY_POS_CI95)]
    return sorted(picked, key=figures.natural_key)


def final_metrics(runs: list[RunData], labels: list[str], names: list[str]) -> dict[str, dict[str, float | None]]:
    """Per run, the last value of each metric (from the last stage that logged it); NaN becomes None."""
    out = {}
    for run, label in zip(runs, labels):
        values = {n: run.final(n) for n in names}
        out[label] = {n: (None if v is None or not math.isfinite(v) else v) for n, v in values.items() if v is not None}
    return out


def tokens_at(run: RunData, stage: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, tokens seen by the end of each step) for a stage, from the loop's throughput and step time
    (tokens/s × s = the step's tokens)."""
    m = run.metrics[stage]
    if "throughput/tokens_per_s" not in m or "time/step_s" not in m:
        raise GlasslabError(
            f"run {run.path} logged no throughput for {stage}, so it cannot be aligned by tokens: use --align step"
        )
    tps, dt = m["throughput/tokens_per_s"], m["time/step_s"]
    if not np.array_equal(tps.steps, dt.steps):
        raise GlasslabError(
            f"run {run.path}: throughput and step time were logged at different steps of {stage}: use --align step"
        )
    return tps.steps, np.cumsum(np.nan_to_num(tps.values * dt.values))


def aligned_x(run: RunData, stage: str, steps: np.ndarray, align: Align) -> np.ndarray:
    if align == "step":
        return steps.astype(np.float64)
    known, tokens = tokens_at(run, stage)
    return np.round(np.interp(steps, known, tokens))


def _load(run_paths: list[Path]) -> tuple[list[RunData], list[str]]:
    if len(run_paths) < 2:
        raise GlasslabError("compare needs at least two runs: glasslab compare runs/a runs/b")
    runs = [load_run(Path(p)) for p in run_paths]
    return runs, run_labels(runs)


def compare_summary(run_paths: list[Path], pattern: str | None = None) -> dict[str, Any]:
    runs, labels = _load(run_paths)
    names = headline_names(runs, pattern)
    listing = [
        {"label": label, "path": str(r.path), "status": r.manifest.get("status"), "stages": r.stages}
        for r, label in zip(runs, labels)
    ]
    return {
        "runs": listing,
        "config_diff": config_diff(runs, labels),
        "final_metrics": final_metrics(runs, labels, names),
    }


def build_compare(run_paths: list[Path], out: Path, align: Align = "step", pattern: str | None = None) -> Path:
    """Write the comparison page to `out` and return it."""
    from glasslab.report.page import render_page

    if align not in ("step", "tokens"):
        raise GlasslabError(f"unknown alignment '{align}': use step or tokens")
    runs, labels = _load(run_paths)
    names = headline_names(runs, pattern)
    sections = [Section("runs", "Runs")]
    sections[0].html(
        table(
            ["run", "status", "stages", "path"],
            [(label, r.manifest.get("status"), ", ".join(r.stages), str(r.path)) for r, label in zip(runs, labels)],
        )
    )
    diff = config_diff(runs, labels)
    cfg = Section("config-diff", "Config differences", intro="Only the keys whose values differ between the runs.")
    cfg.html(
        table(["key", *labels], [(k, *v.values()) for k, v in diff.items()])
        if diff
        else "<p>The configs are identical.</p>"
    )
    sections.append(cfg)
    stages = list(dict.fromkeys(s for r in runs for s in r.stages))
    rows = []
    for stage in stages:
        for n in names:
            values = [r.final(n, stage) for r in runs]
            if any(v is not None for v in values):
                rows.append((stage, n, *values))
    fin = Section("final", "Final values", intro="Each metric's last value in each stage.")
    fin.html(table(["stage", "metric", *labels], rows))
    sections.append(fin)
    xlabel = "tokens" if align == "tokens" else "step"
    for stage in stages:
        sec = Section(f"stage-{stage}", f"Curves: {stage}", intro=f"x axis: {xlabel} within the stage.")
        for name in names:
            series = []
            for run, label in zip(runs, labels):
                s = run.metrics.get(stage, {}).get(name)
                if s is not None and len(s.steps) > 1:
                    series.append((label, aligned_x(run, stage, s.steps, align), s.values))
            if series:
                sec.figure(figures.lines(name, series, xlabel=xlabel, ylog=name in ("optim/grad_norm", "val/ppl")))
        if sec.items:
            sections.append(sec)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        out,
        render_page(
            f"glasslab compare: {', '.join(labels)}", sections, subtitle=f"{len(runs)} runs, aligned by {align}"
        ),
    )
    return out
