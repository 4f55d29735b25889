"""Reinforcement learning from an environment's rewards: GRPO, or DPO on pairs built from it.

The policy and a frozen reference both start from the SFT checkpoint. The stage adds its hooks to the one
training loop: reference resets, rollout tables, training time and the reward-hacking detectors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glasslab.config import Config
from glasslab.envs import get_env
from glasslab.envs.base import Environment
from glasslab.envs.mixture import Mixture
from glasslab.errors import GlasslabError
from glasslab.model.gpt import GPT
from glasslab.objectives.dpo import DPO
from glasslab.objectives.grpo import GRPO
from glasslab.probes import build_probes
from glasslab.rl.hacking import HackingDetectors, HackingHook
from glasslab.rl.hooks import ReferenceReset, RolloutTable, TrainingTime
from glasslab.stages.common import load_weights, setup_runtime, stage_run, stage_tokenizer
from glasslab.track.checkpoint import latest_checkpoint
from glasslab.track.layout import SFT
from glasslab.track.rundir import RunDir
from glasslab.train.balance import balancing_hooks
from glasslab.train.distributed import rank
from glasslab.train.loop import Hook, train


def rl_env_names(cfg: Config) -> list[str]:
    """The environments `rl.env` names: one, or a mixture's members."""
    return [cfg.rl.env] if isinstance(cfg.rl.env, str) else list(cfg.rl.env)


def rl_env(cfg: Config) -> Environment:
    """The RL environment (a Mixture for several): each with its [envs.<env>] options, [rl.env_options.<env>]
    over them."""
    members = {
        name: get_env(name, {**cfg.envs.get(name, {}), **cfg.rl.env_options.get(name, {})})
        for name in rl_env_names(cfg)
    }
    return Mixture(members, cfg.rl.env) if isinstance(cfg.rl.env, dict) else members[cfg.rl.env]


def retention_envs(cfg: Config) -> list[tuple[str, Environment]]:
    """(task name `<env>@sft`, environment) for each RL environment that `[rl.env_options]` changes, with its
    `[envs.<env>]` options alone: the problems SFT trained on, evaluated to show what RL on others costs there."""
    if not cfg.rl.retention_eval:
        return []
    changed = [name for name in rl_env_names(cfg) if cfg.rl.env_options.get(name)]
    return [(f"{name}@sft", get_env(name, cfg.envs.get(name, {}))) for name in changed]


def rl(
    cfg: Config,
    run: RunDir,
    *,
    init: Path | None = None,
    hooks: list[Hook] = (),
    progress: Any = None,  # type: ignore[assignment]
) -> GPT:
    """`init`: the checkpoint directory both policy and reference start from (None: this run's latest SFT one)."""
    device = setup_runtime(cfg.system, cfg.seed)
    run.update_manifest(device=str(device), seed=cfg.seed)
    tok = stage_tokenizer(cfg, run, "rl")
    start = init or latest_checkpoint(run.checkpoints_dir, SFT)
    if start is None:
        raise GlasslabError(f"run {run.path} has no SFT checkpoint to start RL from: run `glasslab sft` first")
    model, ref = GPT(cfg.model), GPT(cfg.model)
    load_weights(model, start, cfg)
    ref.load_state_dict(model.state_dict())
    model.to(device)
    ref.to(device).eval().requires_grad_(False)
    env = rl_env(cfg)
    algo = {"grpo": GRPO, "dpo": DPO}[cfg.rl.algo]
    objective = algo(
        env, tok, ref, cfg.rl, cfg.eval, seed=cfg.seed, device=device, rank=rank(), retention=retention_envs(cfg)
    )
    stage_hooks: list[Hook] = [TrainingTime(), RolloutTable(run, cfg.rl.table_every)]
    if cfg.rl.ref_reset_every:
        stage_hooks.append(ReferenceReset(objective, cfg.rl.ref_reset_every, run))
    stage_hooks.append(HackingHook(HackingDetectors(cfg.rl.detect_window)))
    with stage_run(run, objective.stage) as store:
        if latest_checkpoint(run.checkpoints_dir, objective.stage) is None:
            store.log(0, objective.stage, objective.evaluate(model))  # the curves start at the SFT model
        all_hooks = [*stage_hooks, *hooks, *balancing_hooks(cfg.model), *build_probes(cfg, run, tok)]
        try:
            train(
                model,
                objective,
                cfg.rl.train,
                run,
                store,
                arch=cfg.model.model_dump(),
                hooks=all_hooks,
                progress=progress,
                system=cfg.system,
            )
        finally:
            objective.close()  # with rl.generate_ahead: stop its process, give back the intra-op threads
    return model
