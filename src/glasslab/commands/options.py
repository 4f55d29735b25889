"""Options shared by every command, so each command spells them the same way."""

from pathlib import Path
from typing import Annotated

import typer

Preset = Annotated[str, typer.Option(help="smoke | tiny | small | gpt2-124m")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="a TOML file layered over the preset")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="override a config key: --set train.lr=3e-3")]
Name = Annotated[str | None, typer.Option(help="the run's name (default: stage-preset-time)")]
RunsDir = Annotated[Path, typer.Option("--runs-dir", help="where runs live")]
Seed = Annotated[int | None, typer.Option(help="random seed (overrides the config)")]
Profile = Annotated[
    int,
    typer.Option(
        "--profile",
        help="profile N steps of each stage (torch.profiler): profile/<stage>/trace.json and a table of time by part",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")]
Overwrite = Annotated[bool, typer.Option(help="replace an existing run of that name")]
Resume = Annotated[bool, typer.Option(help="continue an existing run of that name")]
RunArg = Annotated[Path, typer.Argument(help="a run directory, e.g. runs/my-run")]
Runs = Annotated[list[Path], typer.Argument(help="run directories, e.g. runs/a runs/b")]
Align = Annotated[str, typer.Option(help="x axis: step, or tokens seen (from the logged throughput)")]
