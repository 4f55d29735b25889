"""`glasslab tune`: a deterministic search over a spec's knobs, each step an experiment in the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glasslab.commands.experiment import ExperimentsDir
from glasslab.commands.options import Json
from glasslab.track import layout


def tune(
    spec: Annotated[Path, typer.Argument(help="a tune .toml: base, metric, seeds, budget, max_experiments, [[knobs]]")],
    workers: Annotated[int, typer.Option(help="runs in parallel within each experiment")] = 1,
    dir_: ExperimentsDir = Path(layout.EXPERIMENTS),
    json_: Json = False,
) -> None:
    """Coordinate search over the spec's knobs: each value is an experiment against the best so far, adopted only
    when kept (better again on fresh seeds). Ends with the best configuration found, or says none beat the base.
    Exit codes: 0 searched (improved or not), 2 bad spec, 130 interrupted."""
    from glasslab.errors import GlasslabError
    from glasslab.experiment.runner import run_experiment
    from glasslab.experiment.tune import load_tune_spec
    from glasslab.experiment.tune import tune as search
    from glasslab.ui import console, emit_json

    if workers < 1:
        raise GlasslabError(f"--workers {workers} must be at least 1")

    def say(line: str) -> None:
        console.print(line, highlight=False)

    try:
        result = search(
            load_tune_spec(spec), lambda req: run_experiment(req, root=dir_, workers=workers, report=say), say
        )
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: complete runs are kept; the same command reuses them")
        raise typer.Exit(130) from None
    if json_:
        emit_json(result)
        return
    console.rule(f"tune {result['tune']}")
    console.print(result["verdict"], highlight=False)
