"""Reports that read run directories: one run (`build_report`), several overlaid (`compare`), paper figures (`plot`)."""

from __future__ import annotations

from pathlib import Path

from glasslab.track.atomic import write_text_atomic
from glasslab.track.rundir import RunDir


def build_report(run_path: Path) -> Path:
    """(Re)write <run>/report.html from whatever the run has logged so far; returns its path."""
    from glasslab.report.page import render_page
    from glasslab.report.rundata import load_run
    from glasslab.report.sections import build_sections

    run = load_run(Path(run_path))
    status = run.manifest.get("status", "?")
    subtitle = f"{run.path} · {status} · stages {', '.join(run.stages) or 'none yet'}"
    out = RunDir(run.path).report_path
    write_text_atomic(out, render_page(f"glasslab run: {run.name}", build_sections(run), subtitle=subtitle))
    return out
