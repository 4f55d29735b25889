"""`glasslab report`: RUN/report.html, one self-contained page with every figure a run's metrics allow."""

from __future__ import annotations

from glasslab.commands.options import Json, RunArg


def report(run_dir: RunArg, json_: Json = False) -> None:
    """(Re)build RUN/report.html: one self-contained page with every figure the run's metrics allow."""
    from glasslab.report import build_report
    from glasslab.ui import console, emit_json

    out = build_report(run_dir)
    if json_:
        emit_json({"run": str(run_dir), "report": str(out)})
        return
    console.print(f"report: {out}", highlight=False)
