"""Runs a study plan: each run is a `glasslab run` subprocess, up to `workers` at a time, each with
cores // workers threads. Finished runs are skipped and interrupted ones resumed, so running the same
study again continues where it stopped; the shared base run (if any) goes first, on every core.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from glasslab.errors import GlasslabError
from glasslab.study.plan import BASE_NAME, Plan, PlannedRun
from glasslab.track import layout
from glasslab.track.atomic import write_json_atomic
from glasslab.track.rundir import RunDir

# The same glasslab installation as this process, whatever PATH says.
GLASSLAB = [sys.executable, "-c", "import sys; from glasslab.cli import main; sys.argv[0] = 'glasslab'; main()"]

Action = Literal["start", "resume", "skip", "failed"]


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def action_for(run_dir: Path, stages: list[str], *, retry_failed: bool = False) -> Action:
    """skip: completed with every stage done; failed: ended in an error (e.g. diverged) and is left as a
    result unless retried; resume: started but not finished (killed, interrupted); start: never started."""
    run = RunDir(run_dir)
    if not run.exists():
        return "start"
    try:
        manifest = run.read_manifest()
    except GlasslabError:  # not valid JSON
        return "failed"
    status = manifest.get("status")
    if status == "completed" and set(stages) <= set(manifest.get("stages_done", [])):
        return "skip"
    if status == "failed" and not retry_failed:
        return "failed"
    return "resume"


def command_for(run: PlannedRun, plan: Plan, runs_dir: Path, action: Action, threads: int) -> list[str]:
    if action == "resume":
        return [*GLASSLAB, "resume", str(runs_dir / run.name), "--json"]
    cmd = [
        *GLASSLAB,
        "run",
        "--preset",
        plan.spec.preset,
        "--name",
        run.name,
        "--runs-dir",
        str(runs_dir),
        "--seed",
        str(run.seed),
        "--stages",
        ",".join(run.stages),
        "--json",
    ]
    for pair in [*run.sets, f"system.threads={threads}"]:
        cmd += ["--set", pair]
    if run.from_base:
        cmd += ["--from", str(runs_dir / BASE_NAME)]
    return cmd


def claim_study_dir(plan: Plan, study_dir: Path) -> None:
    """Record the plan in plan.json; a run already there under the same name must have been made the same way
    (adding seeds or levels to a study is fine, changing what a name means is not)."""
    path = study_dir / layout.STUDY_PLAN
    old = json.loads(path.read_text()) if path.is_file() else {}
    new = {
        r.name: {k: v for k, v in r.as_dict().items() if k != "levels"}
        for r in ([plan.base] if plan.base else []) + plan.runs
    }
    for name, recipe in new.items():
        if name in old and old[name] != recipe:
            raise GlasslabError(
                f"{study_dir} already holds run '{name}' made with other settings (spec, --scale or presets changed): "
                "use another --dir, or delete that directory"
            )
    study_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, old | new)


@dataclass
class Outcome:
    name: str
    action: Action
    returncode: int | None  # None: not run (skipped, or failed before and not retried)
    seconds: float


@dataclass
class _Job:
    run: PlannedRun
    action: Action
    proc: subprocess.Popen
    started: float
    log: object


def execute(
    plan: Plan,
    study_dir: Path,
    *,
    workers: int = 1,
    retry_failed: bool = False,
    report: Callable[[str], None] = print,
) -> list[Outcome]:
    """Run what is not done yet; returns one outcome per planned run (the base run first, if any)."""
    if workers < 1:
        raise GlasslabError(f"--workers {workers} must be at least 1")
    claim_study_dir(plan, study_dir)
    runs_dir, logs = study_dir / layout.STUDY_RUNS, study_dir / layout.STUDY_LOGS
    runs_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(exist_ok=True)
    cores = cpu_cores()
    outcomes: list[Outcome] = []
    if plan.base:
        outcomes += _batch([plan.base], plan, runs_dir, logs, 1, cores, retry_failed, report)
        if action_for(runs_dir / BASE_NAME, plan.base.stages) != "skip":
            raise GlasslabError(
                f"the shared base run failed: see {logs / (BASE_NAME + '.log')}, fix the cause and run the study again"
            )
    outcomes += _batch(plan.runs, plan, runs_dir, logs, workers, max(1, cores // workers), retry_failed, report)
    return outcomes


def _batch(
    runs: list[PlannedRun],
    plan: Plan,
    runs_dir: Path,
    logs: Path,
    workers: int,
    threads: int,
    retry_failed: bool,
    report: Callable[[str], None],
) -> list[Outcome]:
    outcomes: dict[str, Outcome] = {}
    todo: deque[tuple[PlannedRun, Action]] = deque()
    for run in runs:
        action = action_for(runs_dir / run.name, run.stages, retry_failed=retry_failed)
        if action in ("skip", "failed"):
            outcomes[run.name] = Outcome(run.name, action, None, 0.0)
        else:
            todo.append((run, action))
    done = sum(o.action == "skip" for o in outcomes.values())
    if done:
        report(f"{done} run(s) already done")
    if len(outcomes) > done:
        report(f"{len(outcomes) - done} run(s) failed before: kept as results (--retry-failed reruns them)")
    running: list[_Job] = []
    total, finished = len(todo), 0
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        while todo or running:
            while todo and len(running) < workers:
                run, action = todo.popleft()
                log = open(logs / f"{run.name}.log", "a")
                cmd = command_for(run, plan, runs_dir, action, threads)
                log.write(f"$ {' '.join(cmd[3:])}\n")
                log.flush()
                # Own session: a Ctrl-C in the terminal reaches this process only, which then stops each run once.
                env = {**os.environ, **run.env} if run.env else None
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
                running.append(_Job(run, action, proc, time.monotonic(), log))
                report(
                    f"{'resumed' if action == 'resume' else 'started'} {run.name} ({threads} thread{'s' * (threads > 1)})"
                )
            time.sleep(0.2)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                job.log.close()
                finished += 1
                seconds = time.monotonic() - job.started
                outcomes[job.run.name] = Outcome(job.run.name, job.action, job.proc.returncode, seconds)
                state = (
                    "done"
                    if job.proc.returncode == 0
                    else f"FAILED ({_failure(runs_dir / job.run.name, logs / f'{job.run.name}.log')})"
                )
                report(f"[{finished}/{total}] {job.run.name} {state} in {seconds:.0f} s")
    except KeyboardInterrupt:
        _stop(running)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return [outcomes[r.name] for r in runs]


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop(running: list[_Job]) -> None:
    """Ask each run to stop (one SIGTERM: it saves a checkpoint and marks itself interrupted), then wait."""
    for job in running:
        job.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 120
    for job in running:
        try:
            job.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            job.proc.kill()
            job.proc.wait()
        job.log.close()


def _failure(run_dir: Path, log: Path) -> str:
    """Why a run failed: the manifest's message, else the log's last line."""
    try:
        message = RunDir.open(run_dir).read_manifest().get("message")
    except GlasslabError:  # no manifest, or not valid JSON
        message = None
    if message:
        return message
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or re.match(r"\w+(Error|Exception)\b", line)]
    return (errors or lines or ["no output"])[-1][-200:]
