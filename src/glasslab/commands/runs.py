"""`glasslab runs`: every run under a directory with its status, stage, step and headline metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glasslab.commands.options import Json, RunsDir
from glasslab.ui import console, emit_json


def runs(
    runs_dir: RunsDir = Path("runs"),
    compact: Annotated[bool, typer.Option(help="rewrite every run's metrics.parquet from its live store")] = False,
    json_: Json = False,
) -> None:
    """List every run with its status, stage, step and key metrics."""
    from rich.table import Table

    from glasslab.track.metrics import MetricStore
    from glasslab.track.rundir import RunDir, list_runs

    rows = list_runs(runs_dir)
    if compact:
        for r in rows:
            run = RunDir.open(Path(r["path"]))
            if run.metrics_db_path.exists():
                with MetricStore(run.metrics_db_path) as store:
                    store.compact(run.metrics_parquet_path)
    if json_:
        emit_json(rows)
        return
    table = Table("name", "status", "stage", "step", "metrics", title=f"runs in {runs_dir}")
    for r in rows:
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in r.get("metrics", {}).items())
        table.add_row(r["name"], r["status"], str(r.get("stage")), str(r.get("last_step")), metrics)
    console.print(table)
