"""What the stage commands share: the config from options, a new or resumed run, the closing summary."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from glasslab.config import Config, resolve
from glasslab.track.rundir import RunDir
from glasslab.ui import console, emit_json


def config_from_options(
    preset: str, config_file: Path | None, sets: list[str] | None, seed: int | None, profile: int = 0
) -> Config:
    """The config from a command's options; `profile` (--profile N), when given, sets system.profile."""
    from glasslab.train.distributed import init_from_env

    cfg = resolve(preset, config_file, sets)
    if seed is not None:
        cfg.seed = seed
    if profile:
        cfg.system.profile = profile
    init_from_env(cfg.system.device)  # under torchrun: join the process group before touching the run
    return cfg


def new_run(runs_dir: Path, name: str | None, default: str, overwrite: bool, resume: bool) -> tuple[RunDir, bool]:
    from glasslab.train.distributed import barrier, is_main

    path = runs_dir / (name or f"{default}-{datetime.now():%Y%m%d-%H%M%S}")
    if resume and RunDir(path).exists():
        return RunDir.open(path), True
    if is_main():
        run = RunDir.create(path, overwrite=overwrite)
    barrier()  # other ranks open the run rank 0 made
    return (run if is_main() else RunDir.open(path)), False


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
