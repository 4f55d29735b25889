"""`glasslab eval`: a run's accuracy, pass@k and per-difficulty accuracy on a task's held-out problems."""

from __future__ import annotations

from typing import Annotated

import typer

from glasslab.commands.options import CheckpointStage, CheckpointStep, Json, NumBeams, RunArg, Sets
from glasslab.errors import GlasslabError
from glasslab.ui import console, emit_json


def eval_(
    run_dir: RunArg,
    task: Annotated[str, typer.Option(help="task environment: arithmetic, countdown, calculator or module:Class")],
    n: Annotated[int | None, typer.Option(min=1, help="held-out problems (default: the run's eval.n)")] = None,
    seed: Annotated[
        int | None, typer.Option(min=0, help="which held-out set (default: the run's seed, as in training)")
    ] = None,
    k: Annotated[str | None, typer.Option(help="pass@k values, comma-separated (default: eval.pass_k)")] = None,
    samples: Annotated[
        int | None, typer.Option(min=0, help="sampled answers per problem for pass@k (default: eval.samples)")
    ] = None,
    temperature: Annotated[float | None, typer.Option(min=0, help="sampling temperature for pass@k")] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(min=1, help="tokens per answer (default: eval.max_new_tokens)")
    ] = None,
    text: Annotated[
        bool, typer.Option("--text", help="also loss and bits per byte on the pretraining's held-out text")
    ] = False,
    stage: CheckpointStage = None,
    step: CheckpointStep = None,
    num_beams: NumBeams = 1,
    set_: Sets = None,
    json_: Json = False,
) -> None:
    """Accuracy, pass@k and per-difficulty accuracy of a run's checkpoint (the newest, or --stage/--step) on
    held-out problems."""
    from rich.table import Table

    from glasslab.config import resolve
    from glasslab.stages.common import checkpoint_info, load_run_config
    from glasslab.stages.evaluate import evaluate_run
    from glasslab.track.rundir import RunDir

    run = RunDir.open(run_dir)
    cfg = resolve(None, None, set_, base=load_run_config(run).model_dump())
    try:
        pass_k = [int(x) for x in k.split(",")] if k else cfg.eval.pass_k
    except ValueError:
        raise GlasslabError(f"--k '{k}' is not a list of integers: write it like --k 1,4") from None
    if min(pass_k, default=1) < 1:
        raise GlasslabError(f"--k '{k}' has a value below 1: pass@k needs k >= 1, e.g. --k 1,4")
    seed = cfg.seed if seed is None else seed
    done = evaluate_run(
        run,
        cfg,
        task,
        n=n or cfg.eval.n,
        seed=seed,
        pass_k=pass_k,
        samples=cfg.eval.samples if samples is None else samples,
        temperature=cfg.eval.temperature if temperature is None else temperature,
        max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens,
        text=text,
        stage=stage,
        step=step,
        num_beams=num_beams,
    )
    result, text_metrics, step = done.result, done.text, done.step
    if json_:
        emit_json(result.as_dict() | checkpoint_info(done.checkpoint) | ({"text": text_metrics} if text else {}))
        return
    table = Table(
        title=f"{task} on {result.n} held-out problems (seed {seed}), {done.checkpoint.parent.name} step {step}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("accuracy (greedy)" if num_beams == 1 else f"accuracy ({num_beams} beams)", f"{result.accuracy:.1%}")
    for kk, v in result.pass_at_k.items():
        table.add_row(f"pass@{kk}", f"{v:.1%}")
    for name, v in result.rewards.items():
        table.add_row(f"reward {name}", f"{v:.3f}")
    for d, v in result.by_difficulty.items():
        table.add_row(f"accuracy, difficulty {d}", f"{v:.1%}")
    for name, v in result.diagnostics.items():
        table.add_row(name, f"{v:.1%}")
    for name, v in text_metrics.items():
        table.add_row(f"held-out text {name}", f"{v:.4f}")
    console.print(table)
    console.print(f"answers saved to {done.table}")
