"""Pretraining: documents -> tokenizer -> token shards -> GPT trained on next-token prediction."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from glasslab.config import Config
from glasslab.data.mixture import mixture_documents
from glasslab.data.tokens import build_token_splits
from glasslab.model.gpt import GPT
from glasslab.objectives.lm import LanguageModeling
from glasslab.objectives.mixture import MixtureLanguageModeling
from glasslab.probes import build_probes
from glasslab.stages.common import documents, save_config, setup_runtime, stage_run, tokenizer_for
from glasslab.track.rundir import RunDir
from glasslab.train.balance import balancing_hooks
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
    by_domain = mixture_documents(cfg.data) if cfg.data.mixture.sources else {}
    if by_domain:
        docs = [d for domain in by_domain.values() for d in domain]
    elif docs is None:
        docs = documents(cfg)
    tokenizer = tokenizer_for(run, cfg, docs)
    cfg.model.vocab_size = tokenizer.vocab_size
    save_config(run, cfg)
    model = GPT(cfg.model).to(device)
    common = dict(
        batch_size=cfg.train.batch_size,
        block_size=cfg.model.block_size,
        eval_batches_n=cfg.train.eval_batches,
        z_loss=cfg.train.z_loss,
        seed=cfg.seed + rank(),
        device=device,
    )
    split = partial(
        build_token_splits,
        tokenizer=tokenizer,
        cache_dir=run.token_cache_dir,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.seed,
    )
    if by_domain:
        splits = {domain: split(d) for domain, d in by_domain.items()}
        objective = MixtureLanguageModeling(
            splits,
            tokenizer,
            mixture=cfg.data.mixture,
            total_steps=cfg.train.steps,
            grad_accum=cfg.train.grad_accum,
            **common,
        )
    else:
        objective = LanguageModeling(split(docs), tokenizer, **common)
    with stage_run(run, objective.stage) as store:
        train(
            model,
            objective,
            cfg.train,
            run,
            store,
            arch=cfg.model.model_dump(),
            hooks=[*hooks, *balancing_hooks(cfg.model), *build_probes(cfg, run, tokenizer)],
            progress=progress,
            system=cfg.system,
        )
    return model
