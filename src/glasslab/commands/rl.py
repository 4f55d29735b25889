"""`glasslab rl CHAT_RUN`: reinforcement learning (GRPO or DPO) from a chat model, in a new run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from glasslab.commands.common import config_from_options, finish, new_run, resume_run
from glasslab.commands.options import (
    ConfigFile,
    Json,
    Name,
    Overwrite,
    Preset,
    Profile,
    Resume,
    RunArg,
    RunsDir,
    Seed,
    Sets,
)
from glasslab.errors import GlasslabError


def rl(
    parent: RunArg,
    algo: Annotated[str | None, typer.Option(help="grpo | dpo (default: the config's rl.algo)")] = None,
    env: Annotated[
        str | None,
        typer.Option(help="arithmetic | countdown | calculator | module:Class (a mix: rl.env as a table of weights)"),
    ] = None,
    preset: Preset = "tiny",
    config: ConfigFile = None,
    set_: Sets = None,
    name: Name = None,
    runs_dir: RunsDir = Path("runs"),
    seed: Seed = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
    profile: Profile = 0,
    json_: Json = False,
) -> None:
    """Improve a chat model with rewards from a task environment: GRPO with a KL-anchored reference, or DPO."""
    from glasslab.objectives.rollouts import check_reward_weights
    from glasslab.stages.common import load_run_config, save_config
    from glasslab.stages.rl import rl as run_rl
    from glasslab.stages.rl import rl_env
    from glasslab.track.checkpoint import latest_checkpoint
    from glasslab.track.layout import PRETRAIN, stage_of_checkpoint
    from glasslab.track.rundir import RunDir
    from glasslab.ui import console, progress

    overrides = [*(set_ or []), *([f'rl.algo="{algo}"'] if algo else []), *([f'rl.env="{env}"'] if env else [])]
    cfg = config_from_options(preset, config, overrides, seed, profile)
    check_reward_weights(rl_env(cfg), cfg.rl.reward_weights)  # mistakes fail before a run directory exists
    base = RunDir.open(parent)
    init = latest_checkpoint(base.checkpoints_dir)
    if init is None:
        raise GlasslabError(f"run {parent} has no checkpoint to start from: train it first (e.g. `glasslab sft`)")
    run, resumed = new_run(runs_dir, name, f"rl-{cfg.rl.algo}", overwrite, resume)
    if resumed:
        resume_run(run, json_)
        return
    parent_cfg = load_run_config(base)
    cfg.model, cfg.tokenizer = parent_cfg.model, parent_cfg.tokenizer
    shutil.copyfile(base.tokenizer_path, run.tokenizer_path)
    run.update_manifest(command="rl", pipeline=["rl"], preset=preset, init=str(init), parent=str(base.path))
    save_config(run, cfg)
    if stage_of_checkpoint(init) == PRETRAIN:
        note = (
            f"{parent} has no SFT checkpoint: RL starts from the pretrained model, which has never seen the chat "
            "format, so expect rewards near 0 and groups without signal (run `glasslab sft` on it first)"
        )
        run.log_event("notice", note, step=0, stage="rl")
        console.print(f"[yellow]notice[/] {note}", highlight=False)
    with progress() as bar:
        run_rl(cfg, run, init=init, progress=bar)
    run.set_status("completed")
    finish(run, json_)
