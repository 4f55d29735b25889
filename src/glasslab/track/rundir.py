"""The run directory: the one contract between writers (training, probes) and readers (reports, compare).

    runs/<name>/config.toml        resolved config
    runs/<name>/manifest.json      versions, seed, device, status, progress
    runs/<name>/tokenizer.json
    runs/<name>/metrics.db         live metrics (SQLite WAL), metrics.parquet once compacted
    runs/<name>/checkpoints/<stage>/step-0000123/
    runs/<name>/spikes/            dumps around loss spikes
    runs/<name>/samples.jsonl      generated samples
    runs/<name>/events.jsonl       warnings and notices

RunDir holds only a path: all state is on disk, so a killed run can be resumed and a running one read.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import glasslab
from glasslab.errors import GlasslabError
from glasslab.track.atomic import append_jsonl, read_jsonl, write_json_atomic, write_text_atomic
from glasslab.track.metrics import last_values, read_metrics

STATUSES = ("created", "running", "completed", "failed", "interrupted")
KEY_METRICS = ["train/loss", "val/loss", "val/bpb"]
KEY_METRIC_PATTERN = "eval/*/accuracy"


class RunDir:
    def __init__(self, path: Path):
        """Use RunDir.create or RunDir.open, which check the directory is (or becomes) a run."""
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, path: Path, *, overwrite: bool = False) -> RunDir:
        """Start a new run at `path`. Refuses to clobber an existing run unless overwrite=True, and never
        deletes a directory that is not a run."""
        run = cls(path)
        if run.manifest_path.exists():
            if not overwrite:
                raise GlasslabError(
                    f"run '{run.name}' already exists at {run.path}: "
                    f"use a new --name, `glasslab resume {run.path}`, or --overwrite"
                )
            shutil.rmtree(run.path)
        elif run.path.is_file() or (run.path.is_dir() and any(run.path.iterdir())):
            raise GlasslabError(f"{run.path} exists and is not a glasslab run: use a new --name or remove it")
        run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        now = _now()
        write_json_atomic(
            run.manifest_path,
            {
                "glasslab_version": glasslab.__version__,
                "git_commit": _git_commit(),
                "torch_version": torch.__version__,
                "device": None,
                "seed": None,
                "created": now,
                "updated": now,
                "status": "created",
                "stage": None,
                "stages_done": [],
                "last_step": 0,
                "message": None,
            },
        )
        return run

    @classmethod
    def open(cls, path: Path) -> RunDir:
        run = cls(path)
        if not run.manifest_path.is_file():
            raise GlasslabError(f"no run at {run.path} (no manifest.json): check the path or --name")
        return run

    # Paths

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def metrics_db_path(self) -> Path:
        return self.path / "metrics.db"

    @property
    def metrics_parquet_path(self) -> Path:
        return self.path / "metrics.parquet"

    @property
    def samples_path(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def spikes_dir(self) -> Path:
        return self.path / "spikes"

    # Manifest

    def read_manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text())
        except ValueError as e:
            raise GlasslabError(
                f"manifest {self.manifest_path} is not valid JSON ({e}): fix or delete that run directory"
            ) from e

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        """Read-modify-write the manifest atomically (single writer: the process running the stage;
        under torchrun, rank 0 — other ranks only read)."""
        if not _writer():
            return self.read_manifest()
        manifest = self.read_manifest() | fields
        manifest["updated"] = _now()
        write_json_atomic(self.manifest_path, manifest)
        return manifest

    def set_status(self, status: str, message: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        self.update_manifest(status=status, message=message)

    def mark_stage_done(self, stage: str) -> None:
        done = self.read_manifest()["stages_done"]
        if stage not in done:
            self.update_manifest(stages_done=[*done, stage])

    # Logs

    def log_event(
        self, kind: str, message: str, step: int | None = None, stage: str | None = None, **data: Any
    ) -> None:
        """Record a warning or notice (loss spike, reward hacking, ...). `time` is Unix seconds, like metrics."""
        if not _writer():
            return
        append_jsonl(
            self.events_path,
            {"time": time.time(), "kind": kind, "message": message, "step": step, "stage": stage, **data},
        )

    def events(self) -> list[dict]:
        return read_jsonl(self.events_path)

    def truncate_logs_after(self, stage: str, step: int) -> None:
        """Drop events and samples of `stage` logged at a step after `step` (what MetricStore.truncate_after does
        for metrics): a run resumed from the checkpoint of `step` logs them again. A file is rewritten only if
        something is dropped."""
        if not _writer():
            return
        for path in (self.events_path, self.samples_path):
            records = read_jsonl(path)
            kept = [r for r in records if not (r.get("stage") == stage and (r.get("step") or 0) > step)]
            if len(kept) < len(records):
                write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def log_sample(self, record: dict) -> None:
        if _writer():
            append_jsonl(self.samples_path, record)

    def samples(self) -> list[dict]:
        return read_jsonl(self.samples_path)


def list_runs(runs_dir: Path) -> list[dict]:
    """Every run under `runs_dir` with its progress and headline metrics (last values), oldest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = []
    for path in runs_dir.iterdir():
        if not (path / "manifest.json").is_file():
            continue
        manifest = RunDir(path).read_manifest()
        table = read_metrics(path, names=KEY_METRICS, pattern=KEY_METRIC_PATTERN)
        runs.append(
            {
                "name": path.name,
                "path": path,
                **{k: manifest.get(k) for k in ("status", "stage", "stages_done", "last_step", "created", "updated")},
                "metrics": last_values(table),
            }
        )
    return sorted(runs, key=lambda r: (r["created"] or "", r["name"]))


def _writer() -> bool:
    """Under torchrun only rank 0 writes the run directory."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _git_commit() -> str | None:
    """HEAD of the checkout glasslab is imported from, or None for an installed package. Checks that the
    package itself is tracked, so a venv that happens to sit inside some repository reports nothing."""
    package_dir = Path(glasslab.__file__).parent
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "--error-unmatch", "__init__.py"],
            cwd=package_dir,
            capture_output=True,
            timeout=2,
        )
        if tracked.returncode != 0:
            return None
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package_dir, capture_output=True, text=True, timeout=2)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() if head.returncode == 0 else None
