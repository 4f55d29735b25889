"""Long work started by an agent: each experiment or study is a `glasslab ... --json` subprocess, so a tool call
returns an id at once, the server stays responsive, and a cancel is the same SIGTERM a Ctrl-C would be (the
runs checkpoint and stop). Its stdout (the command's JSON) and stderr (progress) go to files under
`<experiments dir>/jobs/`, which outlive the server.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from glasslab.errors import GlasslabError
from glasslab.study.executor import GLASSLAB

State = Literal["running", "done", "refused", "failed", "cancelled"]
JOBS = "jobs"  # inside the experiments directory
EXIT_STATES: dict[int, State] = {0: "done", 3: "refused", 130: "cancelled"}


@dataclass
class Job:
    id: str
    kind: Literal["experiment", "study"]
    argv: list[str]
    proc: subprocess.Popen
    out: Path
    err: Path
    cancelled: bool = False

    def state(self) -> State:
        code = self.proc.poll()
        if code is None:
            return "running"
        if self.cancelled:
            return "cancelled"
        return EXIT_STATES.get(code, "failed")

    def status(self, tail: int = 8) -> dict[str, Any]:
        state = self.state()
        lines = [line for line in self.err.read_text(errors="replace").splitlines() if line.strip()]
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "state": state, "progress": lines[-tail:]}
        if state in ("done", "refused"):
            out["result"] = json.loads(self.out.read_text())
        elif state == "failed":
            out["error"] = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
        return out


class Jobs:
    """The jobs this server started, by id."""

    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / JOBS
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, job_id: str, kind: Literal["experiment", "study"], args: list[str]) -> dict[str, Any]:
        with self._lock:
            if job_id in self.jobs:
                raise GlasslabError(f"job {job_id} already exists: start it under another id")
            self.dir.mkdir(parents=True, exist_ok=True)
            out, err = self.dir / f"{job_id}.json", self.dir / f"{job_id}.log"
            argv = [*GLASSLAB, *args, "--json"]
            with open(out, "w") as fo, open(err, "w") as fe:
                proc = subprocess.Popen(argv, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, start_new_session=True)
            self.jobs[job_id] = Job(job_id, kind, args, proc, out, err)
        return {"id": job_id, "kind": kind, "state": "running"}

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            known = ", ".join(self.jobs) or "none yet"
            raise GlasslabError(f"no job '{job_id}' in this server (jobs: {known}); finished ones are in the ledger")
        return self.jobs[job_id]

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.get(job_id)
        if job.proc.poll() is None:
            job.cancelled = True
            job.proc.send_signal(signal.SIGTERM)  # the executor stops each run at a checkpoint
        return {"id": job_id, "state": "cancelled" if job.cancelled else job.state()}

    def close(self) -> None:
        """Stop what is still running when the server exits: no orphaned training."""
        for job in self.jobs.values():
            if job.proc.poll() is None:
                job.cancelled = True
                job.proc.send_signal(signal.SIGTERM)
        for job in self.jobs.values():
            try:
                job.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                job.proc.kill()
