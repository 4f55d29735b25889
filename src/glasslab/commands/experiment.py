"""`glasslab experiment`: baseline against candidate over paired seeds, a decision with its evidence, a ledger entry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glasslab.commands.options import Json, Sets
from glasslab.track import layout

EXIT_REFUSED = 3  # the candidate is not an experiment (seed only, or no change); recorded in the ledger

ExperimentsDir = Annotated[Path, typer.Option("--dir", help="the experiments directory: ledger.jsonl and runs/")]


def experiment(
    description: Annotated[str, typer.Argument(help="what the candidate changes, in words (kept in the ledger)")] = "",
    sets: Sets = None,
    patch: Annotated[
        Path | None, typer.Option(help="a unified diff applied to an isolated copy of the source tree")
    ] = None,
    tree: Annotated[
        Path | None, typer.Option(help="the tree --patch applies to (default: the working directory's git top level)")
    ] = None,
    metric: Annotated[str, typer.Option(help="the one number compared, e.g. val/bpb or eval/arithmetic/accuracy")] = (
        "val/bpb"
    ),
    goal: Annotated[str, typer.Option(help="min | max | auto (max for accuracy, pass@k, reward; else min)")] = "auto",
    seeds: Annotated[int, typer.Option(help="seeds per arm, paired: baseline and candidate on seeds 0..N-1")] = 3,
    budget: Annotated[
        str | None, typer.Option(help="every stage's budget: 2000steps, 1e6tokens or 60s (seconds: noisy under load)")
    ] = None,
    base: Annotated[str, typer.Option(help="the baseline: a preset or a config .toml")] = "tiny",
    stages: Annotated[str, typer.Option(help="stages each run trains, comma-separated")] = "pretrain",
    min_effect: Annotated[float, typer.Option(help="the smallest effect worth keeping, in the metric's units")] = 0.0,
    aa: Annotated[
        bool, typer.Option("--aa", help="A/A check: the baseline against itself on independent seeds")
    ] = False,
    workers: Annotated[int, typer.Option(help="runs in parallel; a pair of arms trains side by side with 2")] = 1,
    dir_: ExperimentsDir = Path(layout.EXPERIMENTS),
    id_: Annotated[str | None, typer.Option("--id", help="the ledger id to record (default: a new one)")] = None,
    json_: Json = False,
) -> None:
    """Run a baseline and a candidate over the same seeds, decide on the paired difference, append to the ledger.

    Better needs p < 0.05 (paired t-test) and at least --min-effect, and is kept only if it is better again on
    fresh seeds. Exit codes: 0 decided (kept or discarded), 2 bad input, 3 refused (seed-only or no-op candidate),
    130 interrupted (complete runs are kept; the same command reuses them)."""
    from glasslab.errors import GlasslabError
    from glasslab.experiment.arms import Request
    from glasslab.experiment.runner import run_experiment
    from glasslab.ui import console, emit_json

    if goal not in ("auto", "min", "max"):
        raise GlasslabError(f"--goal {goal}: use min, max or auto")
    if not description and not aa:
        raise GlasslabError('say what the candidate changes: glasslab experiment "lr x3" --set train.lr=9e-3')
    req = Request(
        description=description or "A/A check",
        sets=list(sets or []),
        metric=metric,
        goal=goal,  # type: ignore[arg-type]
        seeds=seeds,
        budget=budget,
        base=base,
        stages=[s.strip() for s in stages.split(",") if s.strip()],
        min_effect=min_effect,
        aa=aa,
        patch=patch,
        tree=tree,
    )

    def say(line: str) -> None:
        console.print(line, highlight=False)

    try:
        entry = run_experiment(req, root=dir_, workers=workers, entry_id=id_, report=say)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: complete runs are kept; the same command reuses them")
        raise typer.Exit(130) from None
    if json_:
        emit_json(entry)
    else:
        console.rule(f"experiment {entry['id']}")
        console.print(f"[bold]{entry['decision']}[/]: {entry['reason']}", highlight=False)
        if entry.get("noise_floor") is not None:
            console.print(f"noise floor (baseline seed-to-seed std): {entry['noise_floor']:.4g}", highlight=False)
        console.print(f"ledger: {dir_ / layout.LEDGER}", highlight=False)
    if entry["decision"] == "refused":
        raise typer.Exit(EXIT_REFUSED)
