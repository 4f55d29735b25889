"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

Layout of one checkpoint, ckpt_root/<stage>/step-0000123/ (names from glasslab.track.layout):
    model.safetensors       model state_dict
    optimizer.safetensors   optimizer tensors, keyed by their path ("state.0.exp_avg")
    optimizer.json          the rest of the optimizer state_dict, with tensors replaced by references
    rng.safetensors         RNG states (e.g. {"torch_cpu": torch.get_rng_state()})
    extra.safetensors       tensors of the caller's `extra`, keyed by their path ("hooks.SpikeProbe.0.window")
    state.json              stage, step, save time and the caller's `extra` (sampler, loop and hook state, ...),
                            encoded like optimizer.json
    COMPLETE                written last
The directory is built as .tmp-step-0000123 and renamed into place, so a kill mid-save leaves the
previous checkpoint as the latest valid one.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from glasslab.errors import GlasslabError
from glasslab.track import layout
from glasslab.track.atomic import fsync_dir, fsync_file


@dataclass
class Checkpoint:
    path: Path
    stage: str
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict  # a torch optimizer state_dict, ready for optimizer.load_state_dict
    rng: dict[str, torch.Tensor]
    extra: dict


def save_checkpoint(
    ckpt_root: Path,
    stage: str,
    step: int,
    *,
    model: dict[str, torch.Tensor],
    optimizer: dict,
    extra: dict,
    rng: dict[str, torch.Tensor],
    keep_last: int,
) -> Path:
    """Write a checkpoint atomically, then delete the oldest ones of `stage` beyond `keep_last`.

    Tensors are copied before saving, which makes tied weights (two names, one storage) acceptable to
    safetensors; model.load_state_dict copies each into the shared parameter, so tying survives a load.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    stage_dir = Path(ckpt_root) / stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    for stale in stage_dir.glob(f"{layout.TMP_PREFIX}*"):  # left by a save that was killed; one writer per run
        shutil.rmtree(stale)
    # Encode first, so a non-serialisable `extra` fails before anything touches the disk.
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_json = json.dumps(_encode(optimizer, "", opt_tensors))
    extra_tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(extra, "", extra_tensors)
    state_json = json.dumps({"stage": stage, "step": step, "time": time.time(), "extra": encoded}, indent=2)

    final = stage_dir / layout.checkpoint_name(step)
    tmp = stage_dir / f"{layout.TMP_PREFIX}{final.name}"
    tmp.mkdir()
    save_file({k: _owned(v) for k, v in model.items()}, tmp / layout.CHECKPOINT_MODEL)
    save_file(opt_tensors, tmp / layout.CHECKPOINT_OPTIMIZER)
    save_file({k: _owned(v) for k, v in rng.items()}, tmp / layout.CHECKPOINT_RNG)
    save_file(extra_tensors, tmp / layout.CHECKPOINT_EXTRA)
    (tmp / layout.CHECKPOINT_OPTIMIZER_STATE).write_text(opt_json)
    (tmp / layout.CHECKPOINT_STATE).write_text(state_json)
    for name in (*layout.CHECKPOINT_FILES, layout.CHECKPOINT_EXTRA):
        fsync_file(tmp / name)
    (tmp / layout.CHECKPOINT_COMPLETE).write_text("ok\n")
    fsync_file(tmp / layout.CHECKPOINT_COMPLETE)
    fsync_dir(tmp)

    if final.exists():  # saving the same step again after a resume: swap, never leave neither
        old = stage_dir / f"{layout.TMP_PREFIX}replaced-{final.name}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    fsync_dir(stage_dir)

    older = sorted((d for d in _step_dirs(stage_dir) if d != final), key=checkpoint_step)
    for d in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(d)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint written by save_checkpoint; anything missing or unreadable is a GlasslabError."""
    path = Path(path)
    if not path.is_dir():
        raise GlasslabError(f"no checkpoint at {path}: pass a directory like runs/NAME/checkpoints/STAGE/step-0000100")

    def corrupt(why: str) -> GlasslabError:
        return GlasslabError(
            f"checkpoint {path} is corrupt or incomplete ({why}): delete it to resume from the previous one"
        )

    if not (path / layout.CHECKPOINT_COMPLETE).exists():
        raise corrupt("no COMPLETE marker, the save was interrupted")
    missing = [name for name in layout.CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise corrupt(f"missing {', '.join(missing)}")
    try:
        model = load_file(path / layout.CHECKPOINT_MODEL)
        opt_tensors = load_file(path / layout.CHECKPOINT_OPTIMIZER)
        optimizer = _decode(json.loads((path / layout.CHECKPOINT_OPTIMIZER_STATE).read_text()), opt_tensors)
        rng = load_file(path / layout.CHECKPOINT_RNG)
        state = json.loads((path / layout.CHECKPOINT_STATE).read_text())
        extra_file = path / layout.CHECKPOINT_EXTRA
        extra = _decode(state["extra"], load_file(extra_file) if extra_file.is_file() else {})
        return Checkpoint(path, state["stage"], state["step"], model, optimizer, rng, extra)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise corrupt(f"{type(e).__name__}: {e}") from e


def latest_checkpoint(ckpt_root: Path, stage: str | None = None) -> Path | None:
    """The newest complete checkpoint: highest step of `stage`, or with stage=None the highest step of the
    latest pipeline stage present (layout.PIPELINE order), which a copy of the run directory preserves.
    Interrupted saves (.tmp-* dirs, no COMPLETE marker) are ignored."""
    ckpt_root = Path(ckpt_root)
    if stage is not None:
        return max(_step_dirs(ckpt_root / stage), key=checkpoint_step, default=None)
    stage_dirs = list(ckpt_root.iterdir()) if ckpt_root.is_dir() else []
    candidates = [d for stage_dir in stage_dirs for d in _step_dirs(stage_dir)]
    order = {name: i for i, name in enumerate(layout.PIPELINE)}
    return max(candidates, key=lambda d: (order.get(d.parent.name, -1), checkpoint_step(d)), default=None)


def stage_checkpoints(ckpt_root: Path, stage: str) -> dict[int, Path]:
    """Step -> complete checkpoint dir of one stage, in step order."""
    return {checkpoint_step(d): d for d in sorted(_step_dirs(Path(ckpt_root) / stage), key=checkpoint_step)}


def _step_dirs(stage_dir: Path) -> list[Path]:
    """Complete checkpoint dirs of one stage (a dir is only renamed to step-* once COMPLETE is written)."""
    if not stage_dir.is_dir():
        return []
    return [
        d
        for d in stage_dir.iterdir()
        if layout.step_of_checkpoint(d) is not None and (d / layout.CHECKPOINT_COMPLETE).exists()
    ]


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint directory was saved at, from its name (save_checkpoint names it after the step),
    without loading anything."""
    step = layout.step_of_checkpoint(path)
    if step is None:
        raise GlasslabError(
            f"{path} is not a checkpoint directory: pass one like runs/NAME/checkpoints/STAGE/step-0000100"
        )
    return step


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares storage with nothing (safetensors rejects shared storage)."""
    return t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)


# An optimizer state_dict, like the extra state, is nested dicts/lists/tuples of tensors and plain values, with int
# keys (param indices). JSON has no tensors, tuples or int keys, so those are tagged and restored exactly.


def _join(key: str, part: object) -> str:
    return f"{key}.{part}" if key else str(part)


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        if key in tensors:
            raise TypeError(f"cannot checkpoint: two tensors map to key {key!r}")
        tensors[key] = _owned(obj)
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, _join(key, k), tensors) for k, v in obj.items()}
        if all(isinstance(k, int) for k in obj):
            return {"__int_keys__": {str(k): _encode(v, _join(key, k), tensors) for k, v in obj.items()}}
        raise TypeError(f"cannot checkpoint a dict with mixed key types at {key!r}")
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, _join(key, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(key, i), tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {key!r}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__int_keys__" in obj:
            return {int(k): _decode(v, tensors) for k, v in obj["__int_keys__"].items()}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj
