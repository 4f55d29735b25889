"""Pretraining: documents -> tokenizer -> token shards -> GPT trained on next-token prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from glasslab.config import Config
from glasslab.data.tokens import build_token_splits
from glasslab.model.gpt import GPT
from glasslab.objectives.lm import LanguageModeling
from glasslab.probes import build_probes
from glasslab.stages.common import cache_dir, documents, save_config, setup_runtime, stage_run, tokenizer_for
from glasslab.track.rundir import RunDir
from glasslab.train.distributed import rank, world_size
from glasslab.train.loop import Hook, train


def pretrain(
    cfg: Config,
    run: RunDir,
    *,
    init: Path | None = None,
    hooks: list[Hook] = (),
    progress: Any = None,  # type: ignore[assignment]
    docs: list[str] | None = None,
) -> GPT:
    """`init` is accepted for the common stage signature; pretraining starts from scratch. `docs`: the documents
    the command's input checks already loaded (None: load them)."""
    device = setup_runtime(cfg.system, cfg.seed)
    run.update_manifest(device=str(device), seed=cfg.seed, world_size=world_size())
    docs = documents(cfg) if docs is None else docs
    tokenizer = tokenizer_for(run, cfg, docs)
    cfg.model.vocab_size = tokenizer.vocab_size
    save_config(run, cfg)
    splits = build_token_splits(docs, tokenizer, cache_dir(run), cfg.data.val_fraction, cfg.seed)
    model = GPT(cfg.model).to(device)
    objective = LanguageModeling(
        splits,
        tokenizer,
        batch_size=cfg.train.batch_size,
        block_size=cfg.model.block_size,
        eval_batches_n=cfg.train.eval_batches,
        z_loss=cfg.train.z_loss,
        seed=cfg.seed + rank(),
        device=device,
    )
    with stage_run(run, objective.stage) as store:
        train(
            model,
            objective,
            cfg.train,
            run,
            store,
            arch=cfg.model.model_dump(),
            hooks=[*hooks, *build_probes(cfg, run, tokenizer)],
            progress=progress,
            system=cfg.system,
        )
    return model
