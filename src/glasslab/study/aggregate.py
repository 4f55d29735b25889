"""From run directories to numbers: one value per (run, metric), then per setting (cell) over seeds.

A run that did not complete (diverged, killed) has no values: it is counted as failed in its cell, never
averaged in with a half-trained number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np

from glasslab.report.rundata import RunData, Series, load_run
from glasslab.study.plan import Plan, PlannedRun
from glasslab.study.spec import MetricSpec, StudySpec
from glasslab.study.stats import Summary, summarize
from glasslab.track.rundir import RunDir

REDUCE = {"last": lambda v: v[-1], "max": np.nanmax, "min": np.nanmin, "mean": np.nanmean}
ACROSS = {"mean": np.mean, "max": np.max, "min": np.min}


@dataclass
class RunResult:
    name: str
    path: Path
    seed: int
    levels: dict[str, Any]
    status: str  # completed | failed | interrupted | missing | ...
    message: str | None
    values: dict[str, float | None]  # metric title -> value (None: not logged, or the run did not complete)
    curves: dict[str, Series] = field(default_factory=dict)
    vocab_size: int | None = None
    wall_time_s: float | None = None

    @property
    def completed(self) -> bool:
        return self.status == "completed"


def metric_value(run: RunData, m: MetricSpec, stage: str) -> float | None:
    """`reduce` over the steps (in `window`, if given) of each matching metric of `stage`, then `across` the
    matches (then log10)."""
    metrics = run.metrics.get(stage, {})
    names = [n for n in metrics if fnmatchcase(n, m.name)] if m.is_glob else [m.name] if m.name in metrics else []
    per_name = []
    for n in names:
        steps, values = metrics[n].steps, metrics[n].values
        start, stop = 0.0, float(steps[-1]) if len(steps) else 0.0
        if m.window is not None and len(steps):
            start, stop = m.window[0] * steps[-1], m.window[1] * steps[-1]
            keep = (steps >= start) & ((steps < stop) | ((steps == stop) & (m.window[1] == 1)))
            steps, values = steps[keep], values[keep]
        if m.reduce == "recovery" and len(values):
            below = np.flatnonzero(values < m.threshold)  # never below: the window's length (censored)
            per_name.append(float((steps[below[0]] if len(below) else stop) - start))
        elif len(values) and (m.reduce == "last" or np.isfinite(values).any()):
            per_name.append(float(REDUCE[m.reduce](values)))
    if not per_name:
        return None
    value = float(ACROSS[m.across](per_name))
    if m.log:
        value = math.log10(value) if value > 0 else math.nan
    return value if math.isfinite(value) else None


def collect(plan: Plan, runs_dir: Path) -> list[RunResult]:
    spec = plan.spec
    return [_result(spec, run, runs_dir / run.name) for run in plan.runs]


def _result(spec: StudySpec, planned: PlannedRun, path: Path) -> RunResult:
    if not RunDir(path).exists():
        return RunResult(
            planned.name, path, planned.seed, planned.levels, "missing", None, {m.title: None for m in spec.metrics}
        )
    data = load_run(path)
    status = data.manifest.get("status", "?")
    ok = status == "completed"
    values = {m.title: metric_value(data, m, spec.metric_stage(m)) if ok else None for m in spec.metrics}
    stage = spec.stages[-1]
    curves = {c: data.metrics[stage][c] for c in spec.curves if c in data.metrics.get(stage, {})}
    return RunResult(
        planned.name,
        path,
        planned.seed,
        planned.levels,
        status,
        data.manifest.get("message"),
        values,
        curves,
        data.config.get("model", {}).get("vocab_size"),
        data.manifest.get("wall_time_s"),
    )


@dataclass
class Cell:
    """One setting (a combination of factor levels) over its seeds."""

    levels: dict[str, Any]
    runs: list[RunResult]

    def values(self, metric: str) -> list[float | None]:
        return [r.values.get(metric) for r in self.runs]

    def summary(self, metric: str) -> Summary:
        return summarize(self.values(metric))

    @property
    def failed(self) -> int:
        return sum(not r.completed for r in self.runs)


def cells(results: list[RunResult]) -> list[Cell]:
    """Group runs by their factor levels, in plan order."""
    groups: dict[tuple, Cell] = {}
    for r in results:
        key = tuple(r.levels.items())
        groups.setdefault(key, Cell(dict(r.levels), [])).runs.append(r)
    return list(groups.values())


def mean_curve(runs: list[RunResult], name: str, smooth: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, mean, 95% half-width) over the completed runs that logged `name`, on the steps they all share.
    With smooth > 1 each run's series is first replaced by its trailing mean over that many logged points (a
    per-step metric such as RL's KL is too noisy for a drift to show), starting at the first full window."""
    series = [r.curves[name] for r in runs if r.completed and name in r.curves]
    if not series:
        return None
    steps = series[0].steps
    for s in series[1:]:
        steps = np.intersect1d(steps, s.steps)
    stacked = np.array([s.values[np.searchsorted(s.steps, steps)] for s in series])
    if 1 < smooth <= len(steps):
        cum = np.cumsum(np.pad(stacked, ((0, 0), (1, 0))), axis=1)
        stacked, steps = (cum[:, smooth:] - cum[:, :-smooth]) / smooth, steps[smooth - 1 :]
    stats = [summarize(list(col)) for col in stacked.T]
    return steps, np.array([s.mean for s in stats]), np.array([s.ci95 for s in stats])
