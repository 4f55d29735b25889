"""What every stage needs before its loop: the device, seeds, the run's status bookkeeping and the metric store."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from glasslab.config import Config, SystemConfig
from glasslab.data.corpus import keep_chars, load_documents
from glasslab.data.tokenizer import Tokenizer, load_tokenizer
from glasslab.errors import GlasslabError
from glasslab.model.gpt import GPT
from glasslab.track.atomic import write_text_atomic
from glasslab.track.metrics import MetricStore
from glasslab.track.rundir import RunDir
from glasslab.train.distributed import barrier, init_from_env, is_main
from glasslab.train.loop import Interrupted


def setup_runtime(system: SystemConfig, seed: int) -> torch.device:
    if system.threads:
        torch.set_num_threads(system.threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    distributed = init_from_env(system.device)
    if distributed is not None:
        return distributed
    if system.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(system)


def check_device(system: SystemConfig) -> torch.device | None:
    """The device `system.device` names (None for auto), refusing a misspelt one or CUDA on a machine without it."""
    if system.device == "auto":
        return None
    try:
        device = torch.device(system.device)
    except RuntimeError:
        raise GlasslabError(
            f"system.device '{system.device}' is not a device: use --set system.device=auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GlasslabError(
            f"system.device is '{system.device}' but no CUDA device is visible: use --set system.device=cpu"
        )
    return device


def save_config(run: RunDir, cfg: Config) -> None:
    if is_main():
        write_text_atomic(run.config_path, cfg.to_toml())


def tokenizer_for(run: RunDir, cfg: Config, docs: list[str]) -> Tokenizer:
    """The run's tokenizer: trained once, then always read back from the run directory."""
    if not run.tokenizer_path.exists() and is_main():
        Tokenizer.train(docs, cfg.tokenizer.kind, cfg.tokenizer.vocab_size).save(run.tokenizer_path)
    barrier()
    return load_tokenizer(run.tokenizer_path, cfg.tokenizer)


def documents(cfg: Config) -> list[str]:
    return keep_chars(load_documents(cfg.data.source, cfg.data.text_field), cfg.data.max_chars)


@contextlib.contextmanager
def stage_run(run: RunDir, stage: str) -> Iterator[MetricStore]:
    """Opens the metric store and records how the stage ended: completed, interrupted or failed.
    Whatever happens, metrics.parquet is brought up to date."""
    if not is_main():  # other ranks train but write nothing
        yield MetricStore(run.metrics_db_path)
        return
    store = MetricStore(run.metrics_db_path)
    try:
        yield store
    except Interrupted as e:
        run.set_status("interrupted", f"{e}: continue with `glasslab resume {run.path}`")
        raise
    except KeyboardInterrupt:
        run.set_status("interrupted", f"killed during {stage}: continue with `glasslab resume {run.path}`")
        raise
    except BaseException as e:
        run.set_status("failed", str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    else:
        run.mark_stage_done(stage)
    finally:
        store.flush()
        store.compact(run.metrics_parquet_path)
        store.close()


def load_run_config(run: RunDir) -> Config:
    from glasslab.config import build_config, load_toml

    return build_config(load_toml(run.config_path))


def choose_checkpoint(run: RunDir, stage: str | None = None, step: int | None = None) -> Path:
    """The checkpoint a command reads (`--stage`, `--step`): the newest of the latest stage, or of `stage`, or the
    one of that stage at `step`; the errors list what the run has."""
    from glasslab.track.checkpoint import latest_checkpoint, stage_checkpoints
    from glasslab.track.layout import PIPELINE

    if stage is not None and stage not in PIPELINE:
        raise GlasslabError(f"--stage '{stage}' is not a training stage: use one of {', '.join(PIPELINE)}")
    with_checkpoints = [s for s in PIPELINE if stage_checkpoints(run.checkpoints_dir, s)]
    if not with_checkpoints:
        raise GlasslabError(f"run {run.path} has no checkpoint yet: train it first")
    if stage is None:
        stage = latest_checkpoint(run.checkpoints_dir).parent.name
    steps = stage_checkpoints(run.checkpoints_dir, stage)
    if not steps:
        raise GlasslabError(
            f"run {run.path} has no {stage} checkpoint: use --stage {' or '.join(with_checkpoints)}, which have"
        )
    if step is None:
        return steps[max(steps)]
    if step not in steps:
        raise GlasslabError(
            f"run {run.path} has no {stage} checkpoint at step {step}: use --step {' or '.join(map(str, steps))}"
        )
    return steps[step]


def load_model(
    run: RunDir,
    device: torch.device | None = None,
    stage: str | None = None,
    step: int | None = None,
    *,
    checkpoint: Path | None = None,
) -> tuple[GPT, Tokenizer, Config]:
    """A run's checkpoint as a ready model, with its tokenizer and config: `checkpoint` (a directory
    choose_checkpoint returned), or the one choose_checkpoint picks for `stage` and `step`."""
    cfg = load_run_config(run)
    path = checkpoint or choose_checkpoint(run, stage, step)
    model = GPT(cfg.model)
    load_weights(model, path, cfg)
    model.to(device or torch.device("cpu")).eval()
    return model, load_tokenizer(run.tokenizer_path, cfg.tokenizer), cfg


def checkpoint_info(path: Path) -> dict[str, str | int]:
    """What `--json` reports of the checkpoint a command used: its directory, stage and step."""
    state = json.loads((path / "state.json").read_text())
    return {"checkpoint": str(path.resolve()), "stage": state["stage"], "step": state["step"]}


def stage_tokenizer(cfg: Config, run: RunDir, command: str) -> Tokenizer:
    """A fine-tuning stage's tokenizer: the one its run already holds (the stage command copies the parent's)."""
    if not run.tokenizer_path.exists():
        raise GlasslabError(
            f"run {run.path} has no tokenizer.json: start it with `glasslab {command} PARENT_RUN`, which copies it"
        )
    tok = load_tokenizer(run.tokenizer_path, cfg.tokenizer)
    cfg.model.vocab_size = tok.vocab_size
    save_config(run, cfg)
    return tok


def load_weights(model: GPT, path: Path, cfg: Config) -> None:
    """Start `model` from a checkpoint directory, refusing one from another architecture."""
    from glasslab.track.checkpoint import load_checkpoint
    from glasslab.train.loop import check_architecture

    ckpt = load_checkpoint(path)
    check_architecture(ckpt.extra["arch"], cfg.model.model_dump(), path)
    model.load_state_dict(ckpt.model)
