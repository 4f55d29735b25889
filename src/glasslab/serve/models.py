"""The models a server offers: completed runs by name, loaded on first use, a bounded number kept in memory.

Each loaded model has its own `Engine` (scheduler thread and decode batch). When a model must be loaded and the
bound is reached, the least recently used model with nothing to generate is unloaded; if every loaded model is
busy for a couple of seconds the request is refused (503) rather than queued behind another model's traffic.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from glasslab.config import Config
from glasslab.data.tokenizer import Tokenizer
from glasslab.errors import GlasslabError
from glasslab.serve.engine import Engine
from glasslab.track.rundir import RunDir, list_runs

BUSY_WAIT_S = 2.0  # how long a request for an unloaded model waits for a loaded one to fall idle


@dataclass
class Loaded:
    name: str
    tok: Tokenizer
    cfg: Config
    engine: Engine

    @property
    def block_size(self) -> int:
        return self.cfg.model.block_size


class AllBusy(Exception):
    """Every loaded model is generating: none can be unloaded to make room for another."""


def servable_runs(path: Path, stage: str | None) -> tuple[dict[str, Path], Path]:
    """The runs `glasslab serve PATH` offers, by name, and the runs directory the page shows: PATH itself when it
    is a run (its parent is shown), else every completed run under PATH."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return {path.name: path}, path.parent
    if not path.is_dir():
        raise GlasslabError(f"{path} is neither a run nor a directory of runs: give runs/NAME or runs/")
    runs = {r["name"]: Path(r["path"]) for r in list_runs(path) if r["status"] == "completed"}
    if not runs:
        raise GlasslabError(f"no completed run under {path}: train one first, e.g. `glasslab run --preset smoke`")
    return runs, path


class ModelPool:
    def __init__(
        self,
        runs: dict[str, Path],
        *,
        stage: str | None = None,
        max_loaded: int = 2,
        max_batch: int = 32,
        max_queue: int = 64,
        device: torch.device | None = None,
    ) -> None:
        self.runs, self.stage, self.max_loaded = runs, stage, max_loaded
        self.max_batch, self.max_queue, self.device = max_batch, max_queue, device or torch.device("cpu")
        self.loaded: OrderedDict[str, Loaded] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def get(self, name: str) -> Loaded:
        """The model called `name`, loading it (and unloading an idle one) if needed. Blocks while loading:
        call it from a worker thread. KeyError for a name the server does not offer."""
        path = self.runs[name]
        deadline = time.monotonic() + BUSY_WAIT_S
        while True:
            with self._lock:
                if name in self.loaded:
                    self.loaded.move_to_end(name)
                    return self.loaded[name]
                idle = next((n for n, m in self.loaded.items() if m.engine.idle), None)
                if len(self.loaded) < self.max_loaded or idle is not None:
                    if len(self.loaded) >= self.max_loaded:
                        self.loaded.pop(idle).engine.close()
                    return self._load(name, path)
            if time.monotonic() > deadline:
                raise AllBusy(f"all {len(self.loaded)} loaded models are busy")
            time.sleep(0.02)  # a model's last rows leave its batch just after their answers are sent

    def _load(self, name: str, path: Path) -> Loaded:
        from glasslab.stages.common import load_model

        model, tok, cfg = load_model(RunDir.open(path), self.device, self.stage)
        engine = Engine(model, pad_id=tok.pad_id, max_batch=self.max_batch, max_queue=self.max_queue)
        self.loaded[name] = Loaded(name, tok, cfg, engine)
        return self.loaded[name]

    def close(self) -> None:
        with self._lock:
            for m in self.loaded.values():
                m.engine.close()
            self.loaded.clear()
