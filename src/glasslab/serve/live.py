"""The runs directory as the page shows it, read afresh on every poll: the run directory stays the one contract.

The overview is `list_runs` (status, stage, step, headline metrics); a run's page gets the line figures of its
report's stage sections (loss, learning rate, gradient norm, RL reward, evaluations), built by the report's own
code from the live metric store, so the page and `glasslab report` always draw the same curves.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from glasslab.track.rundir import RunDir, list_runs

SUMMARY_KEYS = ("status", "stage", "stages_done", "last_step", "created", "updated", "message")


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    """JSON has no NaN or inf."""
    return {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}


def runs_overview(runs_dir: Path, served: set[str]) -> list[dict[str, Any]]:
    """Every run with its progress and headline metrics, and whether the server can chat with it."""
    return [
        {
            "name": r["name"],
            **{k: r.get(k) for k in SUMMARY_KEYS if k != "message"},
            "metrics": _finite(r["metrics"]),
            "served": r["name"] in served,
        }
        for r in list_runs(runs_dir)
    ]


def run_detail(path: Path) -> dict[str, Any]:
    """A run's summary and the line figures of its report's stage sections."""
    from glasslab.report.rundata import load_run
    from glasslab.report.sections import build_sections

    manifest = RunDir.open(path).read_manifest()
    data = load_run(path)
    figures = [
        {**item, "section": sec.title}
        for sec in build_sections(data)
        if sec.id.startswith("stage-")
        for item in sec.items
        if item["type"] == "lines"
    ]
    return {"name": path.name, **{k: manifest.get(k) for k in SUMMARY_KEYS}, "figures": figures}
