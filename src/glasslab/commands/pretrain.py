"""`glasslab pretrain`: tokenizer and pretraining on the embedded corpus or the user's text."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from glasslab.commands.common import (
    config_from_options,
    finish,
    new_run,
    removed_if_untrained,
    resume_run,
    resuming,
    run_path,
)
from glasslab.commands.options import StageOptions, stage_command


@stage_command
def pretrain(
    data: Annotated[str | None, typer.Option(help="text file, directory, .jsonl, .parquet or datasets dir")] = None,
    probes: Annotated[
        Literal["off", "default", "full"] | None,
        typer.Option(help="probes: off | default cadences | full (every step)"),
    ] = None,
    *,
    opts: StageOptions,
) -> None:
    """Pretrain a GPT on the embedded Shakespeare corpus or your own text."""
    from glasslab.stages.inputs import check_inputs
    from glasslab.stages.pretrain import pretrain as run_pretrain
    from glasslab.ui import progress

    cfg = config_from_options(opts.preset, opts.config, opts.sets, opts.seed, opts.profile)
    if data is not None:
        cfg.data.source = data
    if probes is not None:
        cfg.probes.mode = probes
    path = run_path(opts.runs_dir, opts.name, f"pretrain-{opts.preset}")
    if existing := resuming(path, opts.resume):
        resume_run(existing, opts.json)
        return
    inputs = check_inputs(cfg, ["pretrain"])
    run = new_run(path, opts.overwrite)
    run.update_manifest(pipeline=["pretrain"], preset=opts.preset)
    with removed_if_untrained(run), progress() as bar:
        run_pretrain(cfg, run, progress=bar, docs=inputs.docs)
    run.set_status("completed")
    finish(run, opts.json)
