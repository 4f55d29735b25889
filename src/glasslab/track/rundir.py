"""The run directory: the one contract between writers (training, probes) and readers (reports, compare, studies).

Every path in it comes from `glasslab.track.layout`. RunDir holds only a path: all state is on disk, so a killed
run can be resumed and a running one read. Importing this module does not import torch, so readers stay light.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import tomllib

import glasslab
from glasslab.errors import GlasslabError
from glasslab.track import layout
from glasslab.track.atomic import append_jsonl, read_jsonl, write_json_atomic, write_text_atomic
from glasslab.track.layout import STATUSES, Manifest, Status
from glasslab.track.metrics import last_values, read_metrics

KEY_METRICS = ["train/loss", "val/loss", "val/bpb"]
KEY_METRIC_PATTERN = layout.metric(layout.EVAL_FAMILY, "*", "accuracy")


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
        manifest: Manifest = {
            "glasslab_version": glasslab.__version__,
            "git_commit": _git_commit(),
            "torch_version": _torch_version(),
            "device": None,
            "seed": None,
            "created": now,
            "updated": now,
            "status": "created",
            "stage": None,
            "stages_done": [],
            "last_step": 0,
            "message": None,
        }
        write_json_atomic(run.manifest_path, manifest)
        return run

    @classmethod
    def open(cls, path: Path) -> RunDir:
        run = cls(path)
        if not run.exists():
            raise GlasslabError(
                f"no run at {run.path} (no {layout.MANIFEST}): check the path (a run directory like runs/my-run)"
            )
        return run

    def exists(self) -> bool:
        """Whether the directory is a run: it has a manifest (a run is created with one)."""
        return self.manifest_path.is_file()

    # Paths (names from glasslab.track.layout)

    @property
    def config_path(self) -> Path:
        return self.path / layout.CONFIG

    @property
    def manifest_path(self) -> Path:
        return self.path / layout.MANIFEST

    @property
    def tokenizer_path(self) -> Path:
        return self.path / layout.TOKENIZER

    @property
    def metrics_db_path(self) -> Path:
        return self.path / layout.METRICS_DB

    @property
    def metrics_parquet_path(self) -> Path:
        return self.path / layout.METRICS_PARQUET

    @property
    def samples_path(self) -> Path:
        return self.path / layout.SAMPLES

    @property
    def events_path(self) -> Path:
        return self.path / layout.EVENTS

    @property
    def report_path(self) -> Path:
        return self.path / layout.REPORT

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / layout.CHECKPOINTS

    def stage_checkpoints_dir(self, stage: str) -> Path:
        """checkpoints/<stage>/: that stage's step-N checkpoints (and, for RL, the reset references)."""
        return self.checkpoints_dir / stage

    def checkpoint_path(self, stage: str, step: int) -> Path:
        return self.stage_checkpoints_dir(stage) / layout.checkpoint_name(step)

    def reference_path(self, step: int) -> Path:
        return self.stage_checkpoints_dir(layout.RL) / layout.reference_name(step)

    @property
    def spikes_dir(self) -> Path:
        return self.path / layout.SPIKES

    def spike_path(self, step: int) -> Path:
        return self.spikes_dir / layout.spike_name(step)

    @property
    def rollouts_dir(self) -> Path:
        return self.path / layout.ROLLOUTS

    def rollout_path(self, step: int) -> Path:
        return self.rollouts_dir / layout.rollout_name(step)

    @property
    def eval_dir(self) -> Path:
        return self.path / layout.EVAL_DIR

    def eval_table_path(self, task: str, seed: int) -> Path:
        return self.eval_dir / layout.eval_table_name(task, seed)

    @property
    def final_eval_path(self) -> Path:
        return self.eval_dir / layout.FINAL_EVAL

    def profile_dir(self, stage: str) -> Path:
        """profile/<stage>/: the trace and time-by-part summary of `--profile N`."""
        return self.path / layout.PROFILE_DIR / stage

    def read_profiles(self) -> dict[str, dict]:
        """stage -> profile/<stage>/summary.json for the stages profiled, in pipeline order (unreadable ones left out)."""
        order = {s: i for i, s in enumerate(layout.STAGES)}
        found = sorted(
            (self.path / layout.PROFILE_DIR).glob(f"*/{layout.PROFILE_SUMMARY}"),
            key=lambda p: (order.get(p.parent.name, len(order)), p.parent.name),
        )
        out = {}
        for path in found:
            try:
                out[path.parent.name] = json.loads(path.read_text())
            except ValueError:
                continue
        return out

    @property
    def token_cache_dir(self) -> Path:
        """Token shards are cached beside the runs, shared by every run on the same data and tokenizer."""
        return self.path.parent / layout.TOKEN_CACHE

    # Manifest

    def read_manifest(self) -> Manifest:
        try:
            return json.loads(self.manifest_path.read_text())
        except ValueError as e:
            raise GlasslabError(
                f"manifest {self.manifest_path} is not valid JSON ({e}): fix or delete that run directory"
            ) from e

    def update_manifest(self, **fields: Any) -> Manifest:
        """Read-modify-write the manifest atomically (single writer: the process running the stage;
        under torchrun, rank 0 — other ranks only read)."""
        if not _writer():
            return self.read_manifest()
        unknown = set(fields) - set(layout.MANIFEST_KEYS)
        if unknown:
            raise ValueError(f"not manifest keys (see glasslab.track.layout.Manifest): {sorted(unknown)}")
        manifest: Manifest = {**self.read_manifest(), **fields}  # type: ignore[typeddict-item]
        manifest["updated"] = _now()
        write_json_atomic(self.manifest_path, manifest)
        return manifest

    def set_status(self, status: Status, message: str | None = None) -> None:
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

    # Readers of the other files

    def config_text(self) -> str:
        """config.toml as written, or "" before the run has one."""
        return self.config_path.read_text() if self.config_path.is_file() else ""

    def read_config(self) -> dict[str, Any]:
        """config.toml as a plain dict (no validation: a reader of an old run takes what is there)."""
        try:
            return tomllib.loads(self.config_text())
        except tomllib.TOMLDecodeError as e:
            raise GlasslabError(f"{self.config_path} is not valid TOML ({e}): fix or delete that run directory") from e

    def spike_files(self) -> list[tuple[int, Path]]:
        """(step, path) of every spike dossier, by step."""
        return _step_files(self.spikes_dir, "json")

    def rollout_files(self) -> list[tuple[int, Path]]:
        """(step, path) of every rollout table, by step."""
        return _step_files(self.rollouts_dir, "jsonl")

    def eval_tables(self) -> list[Path]:
        """`glasslab eval`'s answer tables (eval/<task>-seed<S>.jsonl), by name."""
        if not self.eval_dir.is_dir():
            return []
        return sorted(p for p in self.eval_dir.iterdir() if layout.parse_eval_table(p))

    def read_final_eval(self) -> dict[str, dict]:
        """eval/final.json (stage -> task -> summary), or {} if it is missing, torn or not an object."""
        try:
            data = json.loads(self.final_eval_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def list_runs(runs_dir: Path) -> list[dict]:
    """Every run under `runs_dir` with its progress and headline metrics (last values), oldest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    runs = []
    for path in runs_dir.iterdir():
        run = RunDir(path)
        if not run.exists():
            continue
        manifest = run.read_manifest()
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


def _step_files(directory: Path, ext: str) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    return sorted((step, p) for p in directory.iterdir() if (step := layout.step_of_file(p, ext)) is not None)


def _writer() -> bool:
    """Under torchrun only rank 0 writes the run directory. A process that never imported torch.distributed
    cannot be in a process group, so readers without torch write (their own events) freely."""
    dist = sys.modules.get("torch.distributed")
    return dist is None or not dist.is_initialized() or dist.get_rank() == 0


def _torch_version() -> str | None:
    """The installed torch's version, read from its metadata so creating a run does not import torch."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


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
