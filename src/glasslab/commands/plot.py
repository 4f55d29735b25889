"""`glasslab plot`: a publication figure of chosen metrics of one or more runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glasslab.commands.options import Align, Json, Runs


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
