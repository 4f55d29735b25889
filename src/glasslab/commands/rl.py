"""`glasslab rl CHAT_RUN`: reinforcement learning (GRPO or DPO) from a chat model, in a new run."""

from __future__ import annotations

import shutil
from typing import Annotated

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
from glasslab.commands.options import RunArg, StageOptions, stage_command
from glasslab.errors import GlasslabError


@stage_command
def rl(
    parent: RunArg,
    algo: Annotated[str | None, typer.Option(help="grpo | dpo (default: the config's rl.algo)")] = None,
    env: Annotated[
        str | None,
        typer.Option(help="arithmetic | countdown | calculator | module:Class (a mix: rl.env as a table of weights)"),
    ] = None,
    *,
    opts: StageOptions,
) -> None:
    """Improve a chat model with rewards from a task environment: GRPO with a KL-anchored reference, or DPO."""
    from glasslab.stages.common import load_run_config, save_config
    from glasslab.stages.inputs import check_inputs
    from glasslab.stages.rl import rl as run_rl
    from glasslab.track.checkpoint import latest_checkpoint
    from glasslab.track.layout import PRETRAIN, stage_of_checkpoint
    from glasslab.track.rundir import RunDir
    from glasslab.ui import console, progress

    overrides = [*(opts.sets or []), *([f'rl.algo="{algo}"'] if algo else []), *([f'rl.env="{env}"'] if env else [])]
    cfg = config_from_options(opts.preset, opts.config, overrides, opts.seed, opts.profile)
    base = RunDir.open(parent)
    init = latest_checkpoint(base.checkpoints_dir)
    if init is None or not base.tokenizer_path.exists():
        raise GlasslabError(
            f"run {parent} has no checkpoint (or tokenizer) to start from: train it first (e.g. `glasslab sft`)"
        )
    path = run_path(opts.runs_dir, opts.name, f"rl-{cfg.rl.algo}")
    if existing := resuming(path, opts.resume):
        resume_run(existing, opts.json)
        return
    parent_cfg = load_run_config(base)
    cfg.model, cfg.tokenizer = parent_cfg.model, parent_cfg.tokenizer
    check_inputs(cfg, ["rl"])
    run = new_run(path, opts.overwrite)
    shutil.copyfile(base.tokenizer_path, run.tokenizer_path)
    run.update_manifest(command="rl", pipeline=["rl"], preset=opts.preset, init=str(init), parent=str(base.path))
    save_config(run, cfg)
    if stage_of_checkpoint(init) == PRETRAIN:
        note = (
            f"{parent} has no SFT checkpoint: RL starts from the pretrained model, which has never seen the chat "
            "format, so expect rewards near 0 and groups without signal (run `glasslab sft` on it first)"
        )
        run.log_event("notice", note, step=0, stage="rl")
        console.print(f"[yellow]notice[/] {note}", highlight=False)
    with removed_if_untrained(run), progress() as bar:
        run_rl(cfg, run, init=init, progress=bar)
    run.set_status("completed")
    finish(run, opts.json)
