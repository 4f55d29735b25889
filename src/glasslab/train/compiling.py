"""When the training forward goes through torch.compile, and where inductor keeps what it compiled.

`system.compile = "auto"` (the default) compiles when it pays within the stage. It needs batches of one shape
(`StaticShapes`: pretraining's windows), so the graph compiles once instead of at every new length. On CUDA that
is enough. On CPU (with a C++ compiler for inductor) compiling costs as many seconds as thousands of eager steps
with cold caches, and saves a fraction of each step, so it also needs a stage of at least `CPU_MIN_STEPS` steps
(bench/compile_cache.py measures the cost and the saving). The decision depends on the config, the device and
the compiler only, never on what this machine compiled before: compiled and eager steps round differently, so a
command must not change its numbers with the state of a cache, and a resumed stage decides as its first part did.
`true` and `false` force it either way.

Inductor's on-disk caches (the FX graph cache and the AOTAutograd cache) live in the user's cache directory
(`glasslab.train.mfu.cache_dir()`/inductor, unless TORCHINDUCTOR_CACHE_DIR says otherwise), so a second run of
the same shapes, or a resumed one, compiles in seconds.
"""

from __future__ import annotations

import os
import shutil

import torch

from glasslab.train.mfu import cache_dir
from glasslab.train.protocols import StaticShapes

CPU_MIN_STEPS = 5000


def should_compile(setting: bool | str, objective: object, device_type: str, steps: int) -> bool:
    """Whether `train` compiles the objective's training forward, for `system.compile = setting` and a stage of
    `steps` steps."""
    if setting != "auto":
        return bool(setting)
    if not (isinstance(objective, StaticShapes) and objective.static_shapes):
        return False
    if device_type == "cuda":
        return True
    if device_type != "cpu" or not has_cxx():
        return False
    return steps >= CPU_MIN_STEPS


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
