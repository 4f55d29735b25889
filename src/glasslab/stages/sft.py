"""SFT: a pretrained GPT fine-tuned on conversations made by task environments and/or read from a JSONL file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from glasslab.chat.conversations import load_conversations
from glasslab.chat.format import Message
from glasslab.config import Config
from glasslab.data.tokenizer import Tokenizer
from glasslab.data.tokens import build_token_splits
from glasslab.envs import get_env
from glasslab.envs.base import Environment, split_of
from glasslab.errors import GlasslabError
from glasslab.model.gpt import GPT
from glasslab.objectives.sft import Example, SupervisedFineTuning, check_fits, env_conversations, to_example
from glasslab.probes import build_probes
from glasslab.stages.common import documents, load_weights, setup_runtime, stage_run, stage_tokenizer
from glasslab.track.checkpoint import latest_checkpoint
from glasslab.track.layout import PRETRAIN, SFT
from glasslab.track.rundir import RunDir
from glasslab.train.balance import balancing_hooks
from glasslab.train.distributed import rank
from glasslab.train.loop import Hook, train


def shares(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split `total` in proportion to `weights` (largest remainders), so the counts add up exactly."""
    scale = total / sum(weights.values())
    counts = {k: int(w * scale) for k, w in weights.items()}
    by_remainder = sorted(weights, key=lambda k: counts[k] - weights[k] * scale)
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    return counts


def task_data(cfg: Config, tok: Tokenizer, envs: dict[str, Environment]) -> tuple[list[Example], list[Example]]:
    """Each task's training conversations from its train split, its validation ones from its eval split."""
    if not envs:
        return [], []
    weights = {task: cfg.sft.weights.get(task, 1.0) for task in envs}
    n_train, n_val = shares(cfg.sft.examples, weights), shares(cfg.sft.val_examples, weights)
    train, val = [], []
    for task, env in envs.items():
        for split, n, out in (("train", n_train[task], train), ("eval", n_val[task], val)):
            examples = [to_example(m, tok) for m in env_conversations(env, split, n, seed=f"{cfg.seed}:{task}:{split}")]
            check_fits(examples, cfg.model.block_size + 1, f"task '{task}'")
            out += examples
    return train, val


def file_data(cfg: Config, tok: Tokenizer) -> tuple[list[Example], list[Example], list[list[Message]]]:
    """The data file's conversations, a hash-chosen `val_fraction` of them held out; plus a few prompts
    (the held-out conversations up to their first assistant turn) to sample on."""
    if not cfg.sft.data:
        return [], [], []
    conversations = load_conversations(Path(cfg.sft.data), tok, cfg.model.block_size + 1)
    held_out = [
        split_of(json.dumps([[m.role, m.content] for m in c]), cfg.sft.val_fraction) == "eval" for c in conversations
    ]
    train = [to_example(c, tok) for c, h in zip(conversations, held_out) if not h]
    val = [to_example(c, tok) for c, h in zip(conversations, held_out) if h]
    firsts = [c for c, h in zip(conversations, held_out) if h] or conversations
    prompts = [c[: next(i for i, m in enumerate(c) if m.role == "assistant")] for c in firsts[:2]]
    return train, val, prompts


def replay_data(cfg: Config, tok: Tokenizer, cache: Path | None, conversations: int) -> list[Example]:
    """Windows of pretraining text for `sft.replay`, as many as make that share of the training set with
    `conversations` others, drawn at random (fixed by seed) from the corpus's train split (tokens cached in
    `cache`, as pretraining caches them)."""
    n = round(cfg.sft.replay * conversations / (1 - cfg.sft.replay))
    if not n:
        return []
    if cache is None:
        raise GlasslabError("sft.replay needs the pretraining token cache: run SFT through its stage (glasslab sft)")
    tokens = build_token_splits(documents(cfg), tok, cache, cfg.data.val_fraction, cfg.seed).train
    width = cfg.model.block_size // 2 + 1
    if len(tokens) < 2 * width:
        msg = f"sft.replay needs pretraining text, and the corpus has only {len(tokens)} tokens: add some or set sft.replay = 0"
        raise GlasslabError(msg)
    starts = np.random.default_rng([cfg.seed, 7]).integers(0, len(tokens) - width, n)
    return [Example(tokens[s : s + width].tolist(), [True] * width) for s in starts]


def build_objective(
    cfg: Config, tok: Tokenizer, device: torch.device, cache: Path | None = None
) -> SupervisedFineTuning:
    """`cache`: where the pretraining tokens are cached (only sft.replay reads them)."""
    envs = {task: get_env(task, cfg.envs.get(task, {})) for task in cfg.sft.tasks}
    train_tasks, val_tasks = task_data(cfg, tok, envs)
    train_file, val_file, prompts = file_data(cfg, tok)
    replay = replay_data(cfg, tok, cache, len(train_tasks) + len(train_file))
    return SupervisedFineTuning(
        train_tasks + train_file + replay,
        val_tasks + val_file,
        tok,
        envs=envs,
        batch_size=cfg.sft.train.batch_size,
        seed=cfg.seed,
        device=device,
        rank=rank(),
        z_loss=cfg.sft.train.z_loss,
        eval_n=cfg.sft.eval_n,
        max_new_tokens=cfg.sft.max_new_tokens,
        sample_prompts=prompts,
    )


def sft(
    cfg: Config,
    run: RunDir,
    *,
    init: Path | None = None,
    hooks: list[Hook] = (),
    progress: Any = None,  # type: ignore[assignment]
) -> GPT:
    """Fine-tune from the checkpoint dir `init` (None: this run's latest pretrain checkpoint). A run that
    already has SFT checkpoints resumes from them instead."""
    device = setup_runtime(cfg.system, cfg.seed)
    run.update_manifest(device=str(device), seed=cfg.seed)
    tok = stage_tokenizer(cfg, run, "sft")
    model = GPT(cfg.model)
    if latest_checkpoint(run.checkpoints_dir, SFT) is None:
        init = init or latest_checkpoint(run.checkpoints_dir, PRETRAIN)
        if init is None:
            msg = f"run {run.path} has no pretrain checkpoint to fine-tune: pretrain first, or use `glasslab sft BASE_RUN`"
            raise GlasslabError(msg)
        load_weights(model, init, cfg)
    model.to(device)
    objective = build_objective(cfg, tok, device, run.token_cache_dir)
    with stage_run(run, objective.stage) as store:
        train(
            model,
            objective,
            cfg.sft.train,
            run,
            store,
            arch=cfg.model.model_dump(),
            hooks=[*hooks, *balancing_hooks(cfg.model), *build_probes(cfg, run, tok)],
            progress=progress,
            system=cfg.system,
        )
    return model
