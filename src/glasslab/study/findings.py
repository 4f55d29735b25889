"""Findings in words, computed from the aggregated data: for every metric and factor, the levels compared
with the other factors held fixed (Welch's t-test over seeds), and the learning-rate sensitivity if asked.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from glasslab.study.aggregate import Cell, RunResult, cells
from glasslab.study.plan import Plan, level_text
from glasslab.study.stats import Comparison, Summary, p_text, summarize, welch


@dataclass
class Finding:
    kind: str  # comparison | sensitivity | missing
    metric: str
    factor: str
    context: dict[str, Any]  # the other factors, held fixed
    groups: list[dict[str, Any]]  # [{"level", "n", "mean", "ci95", "failed"}], the compared ones first
    text: str
    p: float | None = None
    significant: bool = False
    difference: float | None = None
    difference_ci95: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def num(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def pm(s: Summary) -> str:
    """'0.41 ± 0.07' (95% interval half-width), or just the mean when there is one value."""
    if s.n == 0:
        return "no value"
    return num(s.mean) if s.n < 2 else f"{num(s.mean)} ± {num(s.ci95, 2)}"


def _context_text(context: dict[str, Any]) -> str:
    return ", ".join(f"{k}={level_text(v)}" for k, v in context.items())


def _group(level: Any, c: Cell, metric: str) -> dict[str, Any]:
    s = c.summary(metric)
    return {"level": level, **s.as_dict(), "failed": c.failed, "runs": len(c.runs)}


def _failures(factor: str, level: Any, c: Cell) -> str:
    if not c.failed:
        return ""
    statuses = sorted({r.status for r in c.runs if not r.completed})
    return (
        f"{c.failed} of {len(c.runs)} runs with {factor}={level_text(level)} did not complete ({', '.join(statuses)})"
    )


def _verdict(cmp: Comparison) -> str:
    if not math.isfinite(cmp.p):
        return "not testable with fewer than 2 values per side"
    return f"{p_text(cmp.p)}, {'significant' if cmp.significant else 'not significant'}"


def compare_levels(plan: Plan, results: list[RunResult]) -> list[Finding]:
    """Per metric, factor and setting of the other factors: two levels compared directly; with more levels,
    each level against the factor's baseline if it has one, else the highest and lowest means (every level's
    mean listed)."""
    findings = []
    all_cells = cells(results)
    for m in plan.spec.metrics:
        metric = m.title
        for f in plan.spec.factors:
            levels = plan.levels(f.name)
            if len(levels) < 2:
                continue
            others = [g.name for g in plan.spec.factors if g.name != f.name]
            for combo in itertools.product(*(plan.levels(o) for o in others)):
                context = dict(zip(others, combo))
                by_level = {c.levels[f.name]: c for c in all_cells if all(c.levels[k] == v for k, v in context.items())}
                present = [lv for lv in levels if lv in by_level]
                if f.baseline is not None and len(present) > 2 and f.baseline in present:
                    pairs = [[f.baseline, lv] for lv in present if lv != f.baseline]
                    findings += [_finding(metric, f.name, context, pair, by_level) for pair in pairs]
                else:
                    findings.append(_finding(metric, f.name, context, present, by_level))
    return findings


def _finding(
    metric: str, factor: str, context: dict[str, Any], levels: list[Any], by_level: dict[Any, Cell]
) -> Finding:
    prefix = f"At {_context_text(context)}: " if context else ""
    notes = [n for n in (_failures(factor, lv, by_level[lv]) for lv in levels) if n]
    stats = {lv: by_level[lv].summary(metric) for lv in levels}
    measured = [lv for lv in levels if stats[lv].n > 0]
    if len(measured) < 2:
        text = f"{prefix}{metric} was not measured for at least two levels of {factor}" + (
            f" ({'; '.join(notes)})" if notes else ""
        )
        return Finding(
            "missing", metric, factor, context, [_group(lv, by_level[lv], metric) for lv in levels], text + "."
        )
    if len(levels) == 2:
        a, b = measured
        verb = f"{factor}={level_text(a)}: {metric} {pm(stats[a])} vs {pm(stats[b])} with {factor}={level_text(b)}"
    else:
        a = max(measured, key=lambda lv: stats[lv].mean)
        b = min(measured, key=lambda lv: stats[lv].mean)
        listing = ", ".join(f"{level_text(lv)}: {num(stats[lv].mean)}" for lv in levels if stats[lv].n)
        verb = (
            f"{metric} is highest at {factor}={level_text(a)} ({pm(stats[a])}) and lowest at {factor}={level_text(b)} "
            f"({pm(stats[b])}); by {factor}: {listing}"
        )
    cmp = welch(by_level[a].values(metric), by_level[b].values(metric))
    diff = f"difference {num(cmp.difference)}" + (f" ± {num(cmp.ci95, 2)}" if math.isfinite(cmp.ci95) else "")
    text = f"{prefix}{verb} ({diff}, {_verdict(cmp)})"
    if notes:
        text += f"; {'; '.join(notes)}"
    groups = [_group(lv, by_level[lv], metric) for lv in [a, b] + [lv for lv in levels if lv not in (a, b)]]
    return Finding(
        "comparison", metric, factor, context, groups, text + ".", cmp.p, cmp.significant, cmp.difference, cmp.ci95
    )


def lr_sensitivity(plan: Plan, results: list[RunResult]) -> list[Finding]:
    """Wortsman et al. (2023): E over learning rates of [min(loss, L0) - best loss], per seed, with L0 = ln V (the
    loss of a uniform prediction), which a failed (e.g. diverged) run counts as. One value per setting of the
    other factors, over seeds; two settings are compared with Welch's test."""
    sens = plan.spec.sensitivity
    if sens is None:
        return []
    factor, metric = sens.factor, sens.metric
    vocab = next((r.vocab_size for r in results if r.vocab_size), None)
    if vocab is None:
        return []
    cap = math.log(vocab)
    others = [f.name for f in plan.spec.factors if f.name != factor]
    rows: list[tuple[dict[str, Any], list[float]]] = []
    for combo in itertools.product(*(plan.levels(o) for o in others)):
        context = dict(zip(others, combo))
        per_seed = []
        for seed in plan.seeds:
            here = [r for r in results if r.seed == seed and all(r.levels[k] == v for k, v in context.items())]
            if len(here) < 2 or any(
                r.status not in ("completed", "failed") or (r.completed and r.values.get(metric) is None) for r in here
            ):
                continue  # not finished yet, or the metric was not logged: no value rather than a wrong one
            capped = np.array([min(r.values[metric], cap) if r.completed else cap for r in here])
            per_seed.append(float(capped.mean() - capped.min()))
        rows.append((context, per_seed))
    rule = f"mean over {factor} of min({metric}, ln V) - its best value; runs that did not complete count as ln V = {cap:.3g}"
    findings = []
    for context, values in rows:
        s = summarize(values)
        text = (
            f"Sensitivity to {factor} of {metric}"
            + (f" at {_context_text(context)}" if context else "")
            + f": {pm(s)} ({rule})."
        )
        findings.append(
            Finding(
                "sensitivity",
                metric,
                factor,
                context,
                [{"level": None, **s.as_dict()}],
                text,
                extra={"per_seed": values, "cap": cap},
            )
        )
    if len(rows) == 2:
        (ca, va), (cb, vb) = rows
        cmp = welch(va, vb)
        text = (
            f"Sensitivity to {factor} of {metric}: {pm(summarize(va))} at {_context_text(ca)} vs {pm(summarize(vb))} at "
            f"{_context_text(cb)} ({_verdict(cmp)})."
        )
        findings.insert(
            0,
            Finding(
                "sensitivity",
                metric,
                factor,
                {},
                [{"level": _context_text(c), **summarize(v).as_dict()} for c, v in rows],
                text,
                cmp.p,
                cmp.significant,
                cmp.difference,
                cmp.ci95,
            ),
        )
    return findings


def compute_findings(plan: Plan, results: list[RunResult]) -> list[Finding]:
    """Sensitivity first, then significant differences, then the rest (each group in plan order)."""
    comparisons = compare_levels(plan, results)
    order = {"comparison": 1, "missing": 2}
    comparisons.sort(key=lambda f: (order[f.kind], not f.significant))
    return lr_sensitivity(plan, results) + comparisons
