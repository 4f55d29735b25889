"""What every stage needs before its loop: the device, seeds, the run's status bookkeeping and the metric store."""

from __future__ import annotations

import contextlib
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
    if system.device.startswith("cuda") and not torch.cuda.is_available():
        raise GlasslabError(
            f"system.device is '{system.device}' but no CUDA device is visible: use --set system.device=cpu"
        )
    return torch.device(system.device)


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


def load_model(
    run: RunDir, device: torch.device | None = None, stage: str | None = None
) -> tuple[GPT, Tokenizer, Config]:
    """The newest checkpoint of a run (of `stage`, if given) as a ready model, with its tokenizer and config."""
    from glasslab.track.checkpoint import latest_checkpoint

    cfg = load_run_config(run)
    path = latest_checkpoint(run.checkpoints_dir, stage)
    if path is None:
        raise GlasslabError(f"run {run.path} has no checkpoint{f' for {stage}' if stage else ''} yet: train it first")
    model = GPT(cfg.model)
    load_weights(model, path, cfg)
    model.to(device or torch.device("cpu")).eval()
    return model, load_tokenizer(run.tokenizer_path, cfg.tokenizer), cfg


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
