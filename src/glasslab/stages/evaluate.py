"""`glasslab eval`'s library work: a run's checkpoint on a task's held-out problems (and, optionally, on the
held-out text of the run that pretrained it), logged to the run's metrics as stage `eval` with the answers saved
beside them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from glasslab.config import Config
from glasslab.data.tokenizer import Tokenizer
from glasslab.envs import get_env
from glasslab.errors import GlasslabError
from glasslab.model.gpt import GPT
from glasslab.stages.common import (
    checkpoint_info,
    choose_checkpoint,
    documents,
    load_model,
    load_run_config,
    setup_runtime,
)
from glasslab.track.atomic import write_text_atomic
from glasslab.track.layout import EVAL, EVAL_FAMILY, PRETRAIN, VAL_FAMILY, metric
from glasslab.track.metrics import MetricStore
from glasslab.track.rundir import RunDir
from glasslab.train.evaluate import EvalResult, evaluate_env


@dataclass
class TaskEvaluation:
    result: EvalResult
    text: dict[str, float]  # loss, bpb, ppl on the pretraining run's held-out text (empty unless asked)
    checkpoint: Path
    step: int
    table: Path  # one JSON line per problem: prompt, answer, completion, rewards


def evaluate_run(
    run: RunDir,
    cfg: Config,
    task: str,
    *,
    n: int,
    seed: int,
    pass_k: list[int],
    samples: int,
    temperature: float,
    max_new_tokens: int,
    text: bool,
    stage: str | None = None,
    step: int | None = None,
    num_beams: int = 1,
) -> TaskEvaluation:
    """Evaluate the checkpoint choose_checkpoint picks for `stage` and `step` (default: the newest); its metrics
    are logged at that checkpoint's step."""
    env = get_env(task, cfg.envs.get(task, {}))
    ckpt = choose_checkpoint(run, stage, step)
    device = setup_runtime(cfg.system, seed)
    model, tok, _ = load_model(run, device, checkpoint=ckpt)
    at = int(checkpoint_info(ckpt)["step"])
    result = evaluate_env(
        model,
        tok,
        env,
        n=n,
        seed=seed,
        pass_k=pass_k,
        samples=samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        task=task,
        num_beams=num_beams,
    )
    text_metrics = held_out_text(run, model, tok, device) if text else {}
    with MetricStore(run.metrics_db_path) as store:
        text_values = {metric(EVAL_FAMILY, "text", name): v for name, v in text_metrics.items()}
        store.log(at, EVAL, result.metrics() | text_values)
        store.compact(run.metrics_parquet_path)
    table = run.eval_table_path(task, seed)
    table.parent.mkdir(exist_ok=True)
    write_text_atomic(table, "".join(json.dumps(r) + "\n" for r in result.records))
    return TaskEvaluation(result, text_metrics, ckpt, at, table)


def held_out_text(run: RunDir, model: GPT, tok: Tokenizer, device: torch.device) -> dict[str, float]:
    """loss, bpb and ppl on the held-out text of the run that pretrained this model (this run or an
    ancestor), with that run's own split, so fine-tuning's cost to language modelling shows."""
    from glasslab.data.tokens import build_token_splits
    from glasslab.objectives.lm import LanguageModeling

    source = run
    while PRETRAIN not in source.read_manifest().get("stages_done", []):
        parent = source.read_manifest().get("parent")
        if not parent:
            raise GlasslabError(
                f"neither run {run.path} nor its parents were pretrained here: --text needs that run's data"
            )
        source = RunDir.open(Path(parent))
    cfg = load_run_config(source)
    splits = build_token_splits(documents(cfg), tok, source.token_cache_dir, cfg.data.val_fraction, cfg.seed)
    lm = LanguageModeling(
        splits,
        tok,
        batch_size=cfg.train.batch_size,
        block_size=cfg.model.block_size,
        eval_batches_n=cfg.train.eval_batches,
        z_loss=0.0,
        seed=cfg.seed,
        device=device,
    )
    return {name.removeprefix(metric(VAL_FAMILY, "")): v for name, v in lm.evaluate(model).items()}
