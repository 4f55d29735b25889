"""`glasslab compare`: two or more runs overlaid on one page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glasslab.commands.options import Align, Json, Runs


def compare(
    runs: Runs,
    out: Annotated[
        Path | None, typer.Option(help="where to write the page (default: compare.html beside the first run)")
    ] = None,
    align: Align = "step",
    metric: Annotated[str | None, typer.Option(help="only metrics matching this glob, e.g. 'val/*'")] = None,
    json_: Json = False,
) -> None:
    """Overlay two or more runs: curves, config differences and final values, on one page."""
    from glasslab.report.compare import build_compare, compare_summary
    from glasslab.track.layout import COMPARE
    from glasslab.ui import console, emit_json

    out = out or runs[0].parent / COMPARE
    page = build_compare(runs, out, align=align, pattern=metric)  # type: ignore[arg-type]
    summary = compare_summary(runs, pattern=metric) | {"out": str(page), "align": align}
    if json_:
        emit_json(summary)
        return
    for key, values in summary["config_diff"].items():
        console.print(f"{key}: " + ", ".join(f"{run} {value!r}" for run, value in values.items()), highlight=False)
    console.print(f"compare: {page}", highlight=False)
