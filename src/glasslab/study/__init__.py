"""Studies: a spec (base recipe, factors, seeds) expanded into runs, executed in parallel with skip/resume,
aggregated over seeds, and stated as findings. `run_study` is the whole loop; the parts live in
spec (the TOML model), plan (expansion), executor, aggregate + stats, findings and report."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def default_dir(name: str, scale: float) -> Path:
    """studies/<name>: the spec's name is checked to be one path component, so it stays inside studies/."""
    from glasslab.track.runname import check_run_name

    check_run_name(name, "study name")
    return Path("studies") / (name if scale == 1.0 else f"{name}-x{scale:g}")


def run_study(
    spec: str,
    *,
    study_dir: Path | None = None,
    workers: int = 1,
    scale: float = 1.0,
    seeds: int | None = None,
    retry_failed: bool = False,
    dry_run: bool = False,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Expand, execute what is not done, and write report.html, findings.md and summary.json. With `dry_run`,
    only the plan is returned (names, seeds, overrides), nothing runs."""
    from glasslab.study.executor import execute
    from glasslab.study.plan import expand
    from glasslab.study.report import build_study_report
    from glasslab.study.spec import load_spec

    plan = expand(load_spec(spec), scale=scale, seeds=seeds)
    study_dir = Path(study_dir) if study_dir else default_dir(plan.spec.name, scale)
    if dry_run:
        runs = ([plan.base] if plan.base else []) + plan.runs
        return {"study": plan.spec.name, "dir": str(study_dir), "runs": [r.as_dict() for r in runs]}
    t0 = time.time()
    outcomes = execute(plan, study_dir, workers=workers, retry_failed=retry_failed, report=report)
    return build_study_report(plan, study_dir, outcomes, wall_time_s=time.time() - t0)
