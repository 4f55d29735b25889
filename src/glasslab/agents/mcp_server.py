"""`glasslab mcp`: the lab as Model Context Protocol tools, for an AI agent that runs the loop propose -> experiment
-> decision -> next (AGENTS.md says how).

Built on the official `mcp` SDK's MCPServer (imported only here, and only when the command runs). Tool inputs are
validated the way the CLI validates them, before anything starts; a mistake comes back as one line naming the
problem and the fix, never a traceback. Experiments and studies run in the background (agents/jobs.py): their
tools return an id at once, `status` polls it, `cancel` stops it.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, TypeVar

from glasslab.agents.jobs import Jobs
from glasslab.errors import GlasslabError
from glasslab.track import layout

F = TypeVar("F", bound=Callable[..., Any])
INSTRUCTIONS = (
    "glasslab: a small-LLM lab. Loop: describe_lab -> start_experiment (a change as --set overrides, a metric, "
    "seeds, a budget) -> status until done -> read the decision (kept only if better on screening and on fresh "
    "seeds, with a paired 95% interval) -> next change. Never treat a seed change as a result; run an A/A check "
    "(aa=true) to see the noise. read_ledger shows every decision so far."
)
DETAIL_KEYS = ("rounds", "changes", "sets")


def _clean(x: Any) -> Any:
    """JSON-safe: NaN and inf become None, paths strings."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def _existing_run(run: str) -> Path:
    from glasslab.track.rundir import RunDir

    path = Path(run)
    if not RunDir(path).exists():
        raise GlasslabError(f"'{run}' is not a run directory: list_runs gives the paths")
    return path


def build_server(root: Path, runs_dir: Path) -> tuple[Any, Jobs]:
    """An MCPServer whose tools work on the experiments directory `root` and list runs under `runs_dir`, and the
    jobs it starts."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from glasslab import __version__

    server = MCPServer("glasslab", instructions=INSTRUCTIONS, version=__version__)
    jobs = Jobs(root)

    def tool(fn: F) -> F:
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                return _clean(fn(*args, **kwargs))
            except GlasslabError as e:
                raise ToolError(str(e)) from None
            except Exception as e:  # an agent gets a message to act on, not a traceback
                raise ToolError(f"{type(e).__name__}: {e}") from None

        server.tool()(wrapped)
        return fn

    @tool
    def describe_lab(schema: bool = True) -> dict[str, Any]:
        """The presets (each one's settings over the defaults), every config key with its type, default and help
        (change them with sets=["key=value"]), the budget forms and the rules of evidence."""
        from glasslab.agents.schema import config_schema, presets
        from glasslab.budget import EXAMPLES

        out: dict[str, Any] = {
            "presets": presets(),
            "budget_forms": EXAMPLES,
            "stages": list(layout.PIPELINE),
            "metrics": "val/bpb, val/loss (pretrain, sft); eval/<task>/accuracy (sft, rl); rl/reward/...",
            "rules": "paired seeds; better = paired t p<0.05 and >= min_effect, then again on fresh seeds; "
            "seed-only and no-op candidates are refused",
        }
        if schema:
            out["config"] = config_schema()
        return out

    @tool
    def start_experiment(
        description: str,
        sets: list[str] | None = None,
        metric: str = "val/bpb",
        goal: str = "auto",
        seeds: int = 3,
        budget: str | None = None,
        base: str = "tiny",
        stages: str = "pretrain",
        min_effect: float = 0.0,
        aa: bool = False,
        workers: int = 1,
        patch: str | None = None,
    ) -> dict[str, Any]:
        """Start an experiment in the background: the baseline (base preset or config, with the budget) against
        the candidate (baseline + sets, e.g. ["train.lr=1e-3"]) over seeds 0..seeds-1, paired. Returns its id at
        once; poll status(id). aa=true runs an A/A check instead (no sets). patch: a unified diff file, applied to
        an isolated copy of the server's working tree for the candidate."""
        from glasslab.experiment.arms import Request, prepare
        from glasslab.experiment.ledger import new_id

        if goal not in ("auto", "min", "max"):
            raise GlasslabError(f"goal '{goal}': use min, max or auto")
        if workers < 1:
            raise GlasslabError(f"workers {workers} must be at least 1")
        stage_list = [s.strip() for s in stages.split(",") if s.strip()]
        prepare(
            Request(
                description=description,
                sets=list(sets or []),
                metric=metric,
                goal=goal,  # type: ignore[arg-type]
                seeds=seeds,
                budget=budget,
                base=base,
                stages=stage_list,
                min_effect=min_effect,
                aa=aa,
                patch=Path(patch) if patch else None,
            )
        )
        job_id = new_id()
        args = ["experiment", description, "--id", job_id, "--dir", str(root), "--metric", metric, "--goal", goal]
        args += ["--seeds", str(seeds), "--base", base, "--stages", stages, "--min-effect", repr(min_effect)]
        args += ["--workers", str(workers)] + (["--budget", budget] if budget else []) + (["--aa"] if aa else [])
        for pair in sets or []:
            args += ["--set", pair]
        if patch:
            args += ["--patch", patch]
        return jobs.start(job_id, "experiment", args)

    @tool
    def start_study(spec: str, workers: int = 1, seeds: int | None = None, scale: float = 1.0) -> dict[str, Any]:
        """Start a study (a built-in name or a .toml spec: factors x seeds) in the background; returns its id."""
        from glasslab.experiment.ledger import new_id
        from glasslab.study.plan import expand
        from glasslab.study.spec import load_spec

        if workers < 1:
            raise GlasslabError(f"workers {workers} must be at least 1")
        expand(load_spec(spec), scale=scale, seeds=seeds)
        args = ["study", spec, "--workers", str(workers), "--scale", repr(scale)]
        args += ["--seeds", str(seeds)] if seeds else []
        return jobs.start(f"study-{new_id()}", "study", args)

    @tool
    def status(id: str) -> dict[str, Any]:
        """A job's state (running, done, refused, failed, cancelled), its last progress lines, and its result
        when done (an experiment's ledger entry: decision, verdict, reason, difference, ci95, p, noise_floor)."""
        return jobs.get(id).status()

    @tool
    def cancel(id: str) -> dict[str, Any]:
        """Stop a running job: its runs checkpoint and stop; complete runs stay and are reused later."""
        return jobs.cancel(id)

    @tool
    def read_ledger(last: int = 20, details: bool = False) -> dict[str, Any]:
        """The newest `last` experiments, oldest first: decision, verdict, reason, difference ± ci95, p, noise
        floor; details=true adds each round's runs and values. Also how often A/A checks called noise an effect."""
        from glasslab.experiment import ledger

        if last < 1:
            raise GlasslabError(f"last {last} must be at least 1")
        entries = ledger.read(ledger.ledger_path(root))
        shown = entries[-last:]
        if not details:
            shown = [{k: v for k, v in e.items() if k not in DETAIL_KEYS} for e in shown]
        return {"entries": shown, "total": len(entries), "aa": ledger.aa_rate(entries)}

    @tool
    def list_runs(directory: str | None = None) -> dict[str, Any]:
        """Runs with status, stage, step and headline metrics, in `directory` (default: the server's runs
        directory; the experiments' runs are in '<experiments dir>/runs')."""
        from glasslab.track.rundir import list_runs as runs_in

        where = Path(directory) if directory else runs_dir
        return {"runs_dir": str(where), "runs": runs_in(where)}

    @tool
    def run_summary(run: str) -> dict[str, Any]:
        """A run's manifest (status, stages done, seed, wall time) and the final value of each metric outside the
        per-layer probe families, by stage."""
        from glasslab.report.rundata import load_run

        data = load_run(_existing_run(run))
        final = {
            stage: {n: s.last for n, s in sorted(m.items()) if layout.family_of(n) not in layout.PROBE_FAMILIES}
            for stage, m in data.metrics.items()
        }
        return {"run": run, "manifest": data.manifest, "final": final, "final_eval": data.final_eval}

    @tool
    def metric_series(run: str, pattern: str = "val/*", stage: str | None = None, points: int = 50) -> dict[str, Any]:
        """The metrics of a run matching a glob pattern (e.g. 'val/*', 'train/loss'), each downsampled to at most
        `points` evenly spaced steps (the last step always kept)."""
        import numpy as np

        from glasslab.report.rundata import load_run

        if points < 2:
            raise GlasslabError(f"points {points} must be at least 2")
        data = load_run(_existing_run(run))
        out = []
        for st, metrics in data.metrics.items():
            if stage and st != stage:
                continue
            for name, s in sorted(metrics.items()):
                if fnmatchcase(name, pattern) and len(s.steps):
                    keep = np.unique(np.linspace(0, len(s.steps) - 1, min(points, len(s.steps))).round().astype(int))
                    out.append(
                        {"stage": st, "name": name, "steps": s.steps[keep].tolist(), "values": s.values[keep].tolist()}
                    )
        if not out:
            raise GlasslabError(f"no metric of {run} matches '{pattern}': try 'val/*', 'train/*' or 'eval/*'")
        return {"run": run, "series": out}

    @tool
    def study_findings(study_dir: str) -> dict[str, Any]:
        """A finished study's findings (each comparison with its interval and test) and per-setting values."""
        path = Path(study_dir) / layout.STUDY_SUMMARY
        if not path.is_file():
            raise GlasslabError(f"no {layout.STUDY_SUMMARY} in '{study_dir}': the study has not finished yet")
        summary = json.loads(path.read_text())
        return {k: summary.get(k) for k in ("study", "dir", "report", "findings", "cells", "seeds")}

    @tool
    def compare_runs(runs: list[str], pattern: str | None = None) -> dict[str, Any]:
        """Two or more runs side by side: their config differences and final metric values (a glob filters)."""
        from glasslab.report.compare import compare_summary

        if len(runs) < 2:
            raise GlasslabError("compare_runs needs two runs or more")
        return compare_summary([_existing_run(r) for r in runs], pattern)

    return server, jobs


def serve(root: Path, runs_dir: Path, http_port: int | None = None) -> None:
    """Serve over stdio (the default), or streamable HTTP on 127.0.0.1 only; stop the jobs on the way out."""
    server, jobs = build_server(root, runs_dir)
    try:
        if http_port is None:
            server.run("stdio")
        else:
            server.run("streamable-http", host="127.0.0.1", port=http_port)
    finally:
        jobs.close()
