"""Options shared by every command, so each command spells them the same way."""

from pathlib import Path
from typing import Annotated

import typer

from glasslab.errors import GlasslabError

Preset = Annotated[str, typer.Option(metavar="NAME", help="smoke | tiny | small | gpt2-124m")]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", metavar="FILE", help="a TOML file layered over the preset")
]
Sets = Annotated[
    list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="override a config key: --set train.lr=3e-3")
]
Name = Annotated[str | None, typer.Option(metavar="NAME", help="the run's name (default: stage-preset-time)")]
RunsDir = Annotated[Path, typer.Option("--runs-dir", metavar="DIR", help="where runs live")]
Seed = Annotated[int | None, typer.Option(min=0, metavar="INT", help="random seed (overrides the config)")]
Json = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")]
Overwrite = Annotated[bool, typer.Option(help="replace an existing run of that name")]
Resume = Annotated[bool, typer.Option(help="continue an existing run of that name")]
RunArg = Annotated[Path, typer.Argument(help="a run directory, e.g. runs/my-run")]
Runs = Annotated[list[Path], typer.Argument(help="run directories, e.g. runs/a runs/b")]
CheckpointStage = Annotated[
    str | None, typer.Option("--stage", help="read this stage's checkpoint: pretrain, sft or rl (default: the latest)")
]
CheckpointStep = Annotated[
    int | None, typer.Option("--step", min=0, help="the checkpoint at this step (default: the stage's newest)")
]
Align = Annotated[str, typer.Option(help="x axis: step, or tokens seen (from the logged throughput)")]


def check_top_p(top_p: float | None) -> None:
    """Nucleus sampling keeps a share of the probability mass: in (0, 1] (typer's bounds are closed)."""
    if top_p is not None and not 0 < top_p <= 1:
        raise GlasslabError(f"--top-p {top_p} is out of range: use a value in (0, 1], e.g. --top-p 0.95")
