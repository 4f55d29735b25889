"""When the training forward goes through torch.compile, and where inductor keeps what it compiled.

`system.compile = "auto"` (the default) compiles when it pays within the stage. It needs batches of one shape
(`StaticShapes`: pretraining's windows), so the graph compiles once instead of at every new length. On CUDA that
is enough. On CPU (with a C++ compiler for inductor) compiling costs as many seconds as hundreds to thousands of
eager steps, and saves a fraction of each step, so it also needs a long enough stage: `CPU_MIN_STEPS_COLD` steps
when these shapes were never compiled on this machine, `CPU_MIN_STEPS_WARM` when they were, since then inductor's
on-disk caches hold the compiled graphs and compiling takes a few seconds (bench/compile_cache.py measures both
and the per-step saving). `true` and `false` force it either way; a run with `true` warms the caches for the
runs after it.

Inductor's on-disk caches (the FX graph cache and the AOTAutograd cache) live in the user's cache directory
(`glasslab.train.mfu.cache_dir()`/inductor, unless TORCHINDUCTOR_CACHE_DIR says otherwise); beside them, one
marker file per compiled shape records that the caches are warm for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from glasslab.train.mfu import cache_dir
from glasslab.train.protocols import StaticShapes

CPU_MIN_STEPS_COLD = 5000
CPU_MIN_STEPS_WARM = 500
MARKERS = "glasslab-compiled"  # inside inductor's cache directory


def should_compile(setting: bool | str, objective: object, device_type: str, steps: int, shape_key: str) -> bool:
    """Whether `train` compiles the objective's training forward, for `system.compile = setting`, a stage of
    `steps` steps and the shapes named by `shape_key` (`compile_key`)."""
    if setting != "auto":
        return bool(setting)
    if not (isinstance(objective, StaticShapes) and objective.static_shapes):
        return False
    if device_type == "cuda":
        return True
    if device_type != "cpu" or not has_cxx():
        return False
    return steps >= (CPU_MIN_STEPS_WARM if is_warm(shape_key) else CPU_MIN_STEPS_COLD)


def compile_key(arch: dict, batch_size: int, precision: torch.dtype | None, device_type: str) -> str:
    """What a compiled training graph depends on: torch's version, the architecture, the batch and precision."""
    what = [torch.__version__, arch, batch_size, str(precision), device_type]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def inductor_dir() -> Path:
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_dir() / "inductor")


def is_warm(shape_key: str) -> bool:
    return (inductor_dir() / MARKERS / shape_key).is_file()


def mark_warm(shape_key: str) -> None:
    """Record that inductor's caches now hold the graphs of these shapes (after a compiled step ran)."""
    path = inductor_dir() / MARKERS / shape_key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def has_cxx() -> bool:
    """Is there a C++ compiler for inductor's CPU kernels (CXX, else g++ or clang++ on PATH)?"""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++"]
    return any(shutil.which(n) for n in names)


def enable_compile_cache() -> None:
    """Point inductor's caches at the user's cache directory and turn them on (before the first compilation)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    if hasattr(inductor_config, "autograd_cache"):
        inductor_config.autograd_cache = True


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    enable_compile_cache()
    return torch.compile(model)
