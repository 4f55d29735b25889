"""`glasslab run`: the main job, tokenizer -> pretrain -> SFT -> RL -> eval -> report in one run directory."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from glasslab.commands.common import config_from_options, new_run, removed_if_untrained, resuming, run_path
from glasslab.commands.options import StageOptions, stage_command
from glasslab.errors import GlasslabError


@stage_command
def run(
    stages: Annotated[str, typer.Option(help="comma-separated, in order: pretrain,sft,rl")] = "pretrain,sft,rl",
    from_: Annotated[
        Path | None, typer.Option("--from", help="start the first stage from this run's checkpoint")
    ] = None,
    report: Annotated[bool, typer.Option(help="write report.html at the end")] = True,
    *,
    opts: StageOptions,
) -> None:
    """Run the whole pipeline (or the listed stages) in one run directory, evaluate, and write the report."""
    from glasslab.stages.common import load_run_config, save_config
    from glasslab.stages.inputs import check_inputs
    from glasslab.stages.pipeline import finalize, run_pipeline
    from glasslab.track.checkpoint import latest_checkpoint
    from glasslab.track.layout import PIPELINE
    from glasslab.track.rundir import RunDir
    from glasslab.ui import console, emit_json, progress

    order = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [s for s in order if s not in PIPELINE]
    if unknown or not order:
        raise GlasslabError(
            f"unknown stage '{','.join(unknown)}' in --stages: use some of {','.join(PIPELINE)}, in that order"
        )
    if order != [s for s in PIPELINE if s in order]:
        raise GlasslabError(
            f"--stages '{stages}' is out of order or repeats a stage: use some of {','.join(PIPELINE)}, in that order"
        )
    cfg = config_from_options(opts.preset, opts.config, opts.sets, opts.seed, opts.profile)
    parent = RunDir.open(from_) if from_ else None
    init = latest_checkpoint(parent.checkpoints_dir) if parent else None
    if parent and (init is None or not parent.tokenizer_path.exists()):
        raise GlasslabError(f"run {from_} has no checkpoint (or tokenizer) to start from: train it first")
    path = run_path(opts.runs_dir, opts.name, f"run-{opts.preset}")
    docs, cleanup = None, contextlib.nullcontext()
    if run_dir := resuming(path, opts.resume):
        cfg = load_run_config(run_dir)
        manifest = run_dir.read_manifest()
        order, init = manifest["pipeline"], Path(manifest["init"]) if manifest.get("init") else None
    else:
        if parent:
            base = load_run_config(parent)
            cfg.model, cfg.tokenizer = base.model, base.tokenizer
        docs = check_inputs(cfg, order, tokenizer=parent.tokenizer_path if parent else None).docs
        run_dir = new_run(path, opts.overwrite)
        cleanup = removed_if_untrained(run_dir)
        if parent:
            shutil.copyfile(parent.tokenizer_path, run_dir.tokenizer_path)
        run_dir.update_manifest(
            command="run",
            pipeline=order,
            preset=opts.preset,
            init=str(init) if init else None,
            parent=str(parent.path) if parent else None,
            make_report=report,
        )
        save_config(run_dir, cfg)
    t0 = time.time()
    with cleanup, progress() as bar:
        run_pipeline(cfg, run_dir, order, init=init, progress=bar, docs=docs)
    result = finalize(cfg, run_dir, report=report, started=t0)
    if opts.json:
        emit_json(result)
        return
    console.print(
        f"[green]done[/] in {result['wall_time_s']:.0f} s, peak memory {result['peak_rss_mb']:.0f} MiB: {run_dir.path}"
    )
    for key, value in result.items():
        if key not in ("run", "status", "wall_time_s", "peak_rss_mb") and value is not None:
            console.print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
