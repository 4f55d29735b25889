"""The `glasslab` command. Thin: parse, resolve the config, call one function per command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from glasslab import __version__
from glasslab.commands.common import config_from_options, finish, new_run, resume_run
from glasslab.commands.options import (
    ConfigFile,
    Json,
    Name,
    Overwrite,
    Preset,
    Resume,
    RunArg,
    RunsDir,
    Seed,
    Sets,
)
from glasslab.errors import GlasslabError
from glasslab.ui import console, emit_json, errors

app = typer.Typer(add_completion=False, no_args_is_help=True, help="glasslab: a small-LLM lab you can see through.")


def _version(value: bool) -> None:
    if value:
        print(f"glasslab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """Train a GPT from scratch through tokenizer -> pretraining -> SFT -> RL, and see inside every step."""


@app.command()
def pretrain(
    preset: Preset = "tiny",
    config: ConfigFile = None,
    data: Annotated[str | None, typer.Option(help="text file, directory, .jsonl, .parquet or datasets dir")] = None,
    set_: Sets = None,
    name: Name = None,
    runs_dir: RunsDir = Path("runs"),
    seed: Seed = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
    probes: Annotated[
        Literal["off", "default", "full"] | None,
        typer.Option(help="probes: off | default cadences | full (every step)"),
    ] = None,
    json_: Json = False,
) -> None:
    """Pretrain a GPT on the embedded Shakespeare corpus or your own text."""
    from glasslab.stages.pretrain import pretrain as run_pretrain
    from glasslab.ui import progress

    cfg = config_from_options(preset, config, set_, seed)
    if data is not None:
        cfg.data.source = data
    if probes is not None:
        cfg.probes.mode = probes
    run, resumed = new_run(runs_dir, name, f"pretrain-{preset}", overwrite, resume)
    if resumed:
        resume_run(run, json_)
        return
    run.update_manifest(pipeline=["pretrain"], preset=preset)
    with progress() as bar:
        run_pretrain(cfg, run, progress=bar)
    run.set_status("completed")
    finish(run, json_)


@app.command()
def resume(run_dir: RunArg, json_: Json = False) -> None:
    """Continue a stopped or killed run from its last checkpoint."""
    from glasslab.track.rundir import RunDir

    resume_run(RunDir.open(run_dir), json_)


@app.command()
def sample(
    run_dir: RunArg,
    prompt: Annotated[str, typer.Option(help="text to continue")] = "\n",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 200,
    temperature: Annotated[float, typer.Option(help="0 for greedy")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="keep the k most likely tokens")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass")] = 0.95,
    n: Annotated[int, typer.Option(help="number of samples")] = 1,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    json_: Json = False,
) -> None:
    """Generate text from a run's newest checkpoint."""
    from glasslab.model.generate import generate
    from glasslab.stages.common import load_model
    from glasslab.track.rundir import RunDir

    model, tok, _ = load_model(RunDir.open(run_dir))
    ids = [tok.bos_id, *tok.encode(prompt)]
    out = generate(
        model,
        [ids] * n,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_ids=(tok.end_id,),
        pad_id=tok.pad_id,
        seed=seed,
    )
    texts = [prompt + tok.decode(t, skip_special=True) for t in out.tokens]
    if json_:
        emit_json({"run": str(run_dir), "prompt": prompt, "seed": seed, "samples": texts})
        return
    for i, text in enumerate(texts):
        if n > 1:
            console.rule(f"sample {i + 1}")
        print(text)


@app.command()
def runs(
    runs_dir: RunsDir = Path("runs"),
    compact: Annotated[bool, typer.Option(help="rewrite every run's metrics.parquet from its live store")] = False,
    json_: Json = False,
) -> None:
    """List every run with its status, stage, step and key metrics."""
    from rich.table import Table

    from glasslab.track.metrics import MetricStore
    from glasslab.track.rundir import RunDir, list_runs

    rows = list_runs(runs_dir)
    if compact:
        for r in rows:
            run = RunDir.open(Path(r["path"]))
            if run.metrics_db_path.exists():
                with MetricStore(run.metrics_db_path) as store:
                    store.compact(run.metrics_parquet_path)
    if json_:
        emit_json(rows)
        return
    table = Table("name", "status", "stage", "step", "metrics", title=f"runs in {runs_dir}")
    for r in rows:
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in r.get("metrics", {}).items())
        table.add_row(r["name"], r["status"], str(r.get("stage")), str(r.get("last_step")), metrics)
    console.print(table)


# Feature commands, each defined in its own module under glasslab/commands/ (one registration line each):
app.command(name="report")(__import__("glasslab.commands.report", fromlist=["report"]).report)
app.command(name="compare")(__import__("glasslab.commands.report", fromlist=["compare"]).compare)
app.command(name="plot")(__import__("glasslab.commands.report", fromlist=["plot"]).plot)
app.command(name="study")(__import__("glasslab.commands.study", fromlist=["study"]).study)
app.command(name="probes")(__import__("glasslab.commands.probes", fromlist=["probes"]).probes)
app.command(name="sft")(__import__("glasslab.commands.sft", fromlist=["sft"]).sft)
app.command(name="eval")(__import__("glasslab.commands.sft", fromlist=["eval_"]).eval_)
app.command(name="chat")(__import__("glasslab.commands.sft", fromlist=["chat"]).chat)
app.command(name="rl")(__import__("glasslab.commands.rl", fromlist=["rl"]).rl)
app.command(name="run")(__import__("glasslab.commands.run", fromlist=["run"]).run)


def main() -> None:
    """Entry point: user-fixable errors become one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except GlasslabError as e:
        errors.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: continue with `glasslab resume RUN`")
        sys.exit(130)
    except Exception as e:  # a stop request (the loop checkpointed), or click's usage errors
        import click

        from glasslab.train.loop import Interrupted

        if isinstance(e, Interrupted):
            console.print(f"[yellow]interrupted[/]: {e}; continue with `glasslab resume RUN`")
            sys.exit(130)
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(2)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise
