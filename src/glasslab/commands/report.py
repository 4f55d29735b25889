"""`glasslab report`, `compare` and `plot`: pages and figures made from run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glasslab.commands.options import Json, RunArg

Runs = Annotated[list[Path], typer.Argument(help="run directories, e.g. runs/a runs/b")]
Align = Annotated[str, typer.Option(help="x axis: step, or tokens seen (from the logged throughput)")]


def report(run_dir: RunArg, json_: Json = False) -> None:
    """(Re)build RUN/report.html: one self-contained page with every figure the run's metrics allow."""
    from glasslab.report import build_report
    from glasslab.ui import console, emit_json

    out = build_report(run_dir)
    if json_:
        emit_json({"run": str(run_dir), "report": str(out)})
        return
    console.print(f"report: {out}", highlight=False)


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
    from glasslab.ui import console, emit_json

    out = out or runs[0].parent / "compare.html"
    page = build_compare(runs, out, align=align, pattern=metric)  # type: ignore[arg-type]
    summary = compare_summary(runs, pattern=metric) | {"out": str(page), "align": align}
    if json_:
        emit_json(summary)
        return
    for key, values in summary["config_diff"].items():
        console.print(f"{key}: " + ", ".join(f"{run} {value!r}" for run, value in values.items()), highlight=False)
    console.print(f"compare: {page}", highlight=False)


def plot(
    runs: Runs,
    metric: Annotated[str, typer.Option(help="metric name or glob, e.g. 'attn_entropy/*'")],
    out: Annotated[Path, typer.Option(help="figure file: .png, .pdf or .svg")] = Path("figure.png"),
    stage: Annotated[str | None, typer.Option(help="only this stage (pretrain, sft, rl, eval)")] = None,
    smooth: Annotated[float, typer.Option(help="exponential smoothing weight in [0, 1), e.g. 0.9")] = 0.0,
    align: Align = "step",
    logy: Annotated[bool, typer.Option(help="logarithmic y axis")] = False,
    title: Annotated[str | None, typer.Option(help="figure title")] = None,
    json_: Json = False,
) -> None:
    """A publication-ready figure of the matching metrics of one or more runs."""
    from glasslab.report.plot import plot_metric
    from glasslab.ui import console, emit_json

    path = plot_metric(runs, metric, out, stage=stage, smooth=smooth, align=align, logy=logy, title=title)  # type: ignore[arg-type]
    if json_:
        emit_json({"out": str(path), "metric": metric, "runs": [str(r) for r in runs]})
        return
    console.print(f"figure: {path}", highlight=False)
