"""Options shared by every command, so each command spells them the same way."""

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

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
Profile = Annotated[
    int,
    typer.Option(
        "--profile",
        min=0,
        metavar="N",
        help="profile N steps of each stage (torch.profiler): profile/<stage>/trace.json and a table of time by part",
    ),
]
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
NumBeams = Annotated[int, typer.Option(min=1, help="beam search with this many beams (length-normalised); 1 = off")]
Align = Annotated[str, typer.Option(help="x axis: step, or tokens seen (from the logged throughput)")]


def check_top_p(top_p: float | None) -> None:
    """Nucleus sampling keeps a share of the probability mass: in (0, 1] (typer's bounds are closed)."""
    if top_p is not None and not 0 < top_p <= 1:
        raise GlasslabError(f"--top-p {top_p} is out of range: use a value in (0, 1], e.g. --top-p 0.95")


@dataclass
class StageOptions:
    """The options every stage command (pretrain, sft, rl, run) takes, as `stage_command` hands them over."""

    preset: str
    config: Path | None
    sets: list[str] | None
    name: str | None
    runs_dir: Path
    seed: int | None
    overwrite: bool
    resume: bool
    profile: int
    json: bool


# (parameter, StageOptions field, type, default), in the order `--help` lists them after a command's own options
_STAGE_OPTIONS = [
    ("preset", "preset", Preset, "tiny"),
    ("config", "config", ConfigFile, None),
    ("set_", "sets", Sets, None),
    ("name", "name", Name, None),
    ("runs_dir", "runs_dir", RunsDir, Path("runs")),
    ("seed", "seed", Seed, None),
    ("overwrite", "overwrite", Overwrite, False),
    ("resume", "resume", Resume, False),
    ("profile", "profile", Profile, 0),
    ("json_", "json", Json, False),
]


def stage_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a stage command the shared options once: typer sees them in the command's signature after its own
    parameters, and the command receives them as one keyword argument `opts: StageOptions`."""
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "opts"]
    shared = [
        inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a) for p, _, a, d in _STAGE_OPTIONS
    ]

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        opts = StageOptions(**{field: kwargs.pop(p) for p, field, _, _ in _STAGE_OPTIONS})
        return fn(*args, opts=opts, **kwargs)

    command.__signature__ = inspect.Signature([*own, *shared])  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
    return command
