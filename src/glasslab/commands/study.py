"""`glasslab study`: run a built-in or user study and write its report, findings and summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glasslab.commands.options import Json


def study(
    spec: Annotated[str, typer.Argument(help="a built-in study (kl-ablation, qk-norm-lr, zloss) or a study .toml")],
    workers: Annotated[int, typer.Option(min=1, help="runs in parallel; each gets cores // workers threads")] = 1,
    dir_: Annotated[Path | None, typer.Option("--dir", help="study directory (default: studies/<name>)")] = None,
    scale: Annotated[float, typer.Option(help="multiply every stage's steps, e.g. 4 for a larger study")] = 1.0,
    seeds: Annotated[int | None, typer.Option(min=1, help="use seeds 0..N-1 instead of the spec's")] = None,
    retry_failed: Annotated[
        bool, typer.Option(help="rerun runs that failed (e.g. diverged) instead of keeping them as results")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="print the runs the study would make, run nothing")] = False,
    json_: Json = False,
) -> None:
    """Expand a study into runs (factors x seeds), run what is not done, and report mean, CI and significance.

    Running the same command again skips finished runs and resumes interrupted ones."""
    from glasslab.study import run_study
    from glasslab.ui import console, emit_json

    def say(line: str) -> None:
        console.print(line, highlight=False)

    try:
        result = run_study(
            spec,
            study_dir=dir_,
            workers=workers,
            scale=scale,
            seeds=seeds,
            retry_failed=retry_failed,
            dry_run=dry_run,
            report=say,
        )
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted[/]: the runs saved checkpoints; run the same `glasslab study` command to continue"
        )
        raise typer.Exit(130) from None
    if json_:
        emit_json(result)
        return
    if dry_run:
        for r in result["runs"]:
            console.print(
                f"{r['name']}: seed {r['seed']}, stages {','.join(r['stages'])}, --set {' --set '.join(r['sets']) or '(none)'}",
                highlight=False,
            )
        console.print(f"{len(result['runs'])} runs in {result['dir']}")
        return
    console.rule(f"study {result['study']}")
    for f in result["findings"]:
        console.print(("[bold]" if f["significant"] else "") + f["text"], highlight=False)
    console.print(f"report: {result['report']}\nfindings: {Path(result['dir']) / 'findings.md'}", highlight=False)
