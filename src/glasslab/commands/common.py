"""What the stage commands share: the config from options, a new or resumed run, the closing summary."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from glasslab.config import Config, resolve
from glasslab.errors import GlasslabError
from glasslab.track.rundir import RunDir
from glasslab.track.runname import check_run_name
from glasslab.ui import console, emit_json


def config_from_options(
    preset: str, config_file: Path | None, sets: list[str] | None, seed: int | None, profile: int = 0
) -> Config:
    """The config from a command's options; `profile` (--profile N), when given, sets system.profile."""
    from glasslab.train.distributed import init_from_env

    cfg = resolve(preset, config_file, [*(sets or []), *([f"seed={seed}"] if seed is not None else [])])
    if profile:
        cfg.system.profile = profile
    init_from_env(cfg.system.device)  # under torchrun: join the process group before touching the run
    return cfg


def run_path(runs_dir: Path, name: str | None, default: str) -> Path:
    """Where the command's run lives: runs_dir/<name>, the name checked to be one path component."""
    if name is not None:
        check_run_name(name)
    return runs_dir / (name or f"{default}-{datetime.now():%Y%m%d-%H%M%S}")


def resuming(path: Path, resume: bool) -> RunDir | None:
    """The existing run at `path` when --resume asks to continue it (its own config then applies)."""
    return RunDir.open(path) if resume and (path / "manifest.json").exists() else None


def new_run(path: Path, overwrite: bool) -> RunDir:
    """Create the run directory; call it only once every input is checked (stages/inputs.py)."""
    from glasslab.train.distributed import barrier, is_main

    if is_main():
        run = RunDir.create(path, overwrite=overwrite)
    barrier()  # other ranks open the run rank 0 made
    return run if is_main() else RunDir.open(path)


@contextlib.contextmanager
def removed_if_untrained(run: RunDir) -> Iterator[None]:
    """A new run whose stage fails on its input before training began (no metric store yet: a task's
    conversations longer than the context, found when the stage builds its data) is removed, so the same command
    can run again once the input is fixed. A failure during training keeps the run, its checkpoints and status."""
    from glasslab.train.distributed import is_main

    try:
        yield
    except GlasslabError:
        if is_main() and not run.metrics_db_path.exists():
            shutil.rmtree(run.path, ignore_errors=True)
        raise


def summary(run: RunDir) -> dict:
    from glasslab.track.rundir import list_runs

    return next(r for r in list_runs(run.path.parent) if Path(r["path"]).resolve() == run.path.resolve())


def finish(run: RunDir, as_json: bool) -> None:
    """Print the run's one-line summary, or its JSON."""
    info = summary(run)
    if as_json:
        emit_json(info)
        return
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in info.get("metrics", {}).items())
    console.print(f"[green]{info['status']}[/] {run.path} at step {info['last_step']}: {metrics}")


def resume_run(run: RunDir, as_json: bool) -> None:
    """Run every stage of the run's pipeline that is not done yet; each picks up from its last checkpoint.
    A run made by `glasslab run` also gets its final evaluation and report."""
    from glasslab.stages.common import load_run_config
    from glasslab.stages.pipeline import finalize, run_pipeline
    from glasslab.ui import progress

    manifest = run.read_manifest()
    init = Path(manifest["init"]) if manifest.get("init") else None
    cfg = load_run_config(run)
    started = time.time()
    with progress() as bar:
        run_pipeline(cfg, run, manifest.get("pipeline", []), init=init, progress=bar)
    if manifest.get("command") == "run":
        result = finalize(cfg, run, report=manifest.get("make_report", True), started=started)
        if as_json:
            emit_json(result)
            return
    run.set_status("completed")
    finish(run, as_json)
