"""One experiment, start to ledger: validate, refuse a non-experiment, screen on seeds 0..N-1 (paired), confirm a
winner on fresh seeds, judge, append the entry.

Runs go through the study executor into the experiments directory's shared runs/ (skipping the complete ones,
which is how identical baseline runs are reused) and are read back by the study aggregate. Experiments sharing
an experiments directory take turns (a lock), so two never train the same run at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from glasslab.budget import parse_budget
from glasslab.errors import GlasslabError
from glasslab.experiment import ledger
from glasslab.experiment.arms import BASELINE, CANDIDATE, Arms, Request, arm_id, prepare
from glasslab.experiment.decision import judge
from glasslab.experiment.page import build_ledger_page
from glasslab.experiment.patch import default_tree, patched_tree
from glasslab.experiment.source import code_hash, git_commit
from glasslab.study.stats import summarize
from glasslab.track import layout


@contextlib.contextmanager
def lab_lock(root: Path, report: Callable[[str], None]) -> Iterator[None]:
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / layout.EXPERIMENT_LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"waiting for another experiment in {root} to finish")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def run_experiment(
    req: Request,
    *,
    root: Path = Path(layout.EXPERIMENTS),
    workers: int = 1,
    entry_id: str | None = None,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Returns the ledger entry (already appended)."""
    arms = prepare(req)
    root = Path(root)
    path = ledger.ledger_path(root)
    if entry_id is not None and ledger.find(path, entry_id):
        raise GlasslabError(f"--id {entry_id} is already in {path}: give a new id, or none")
    if workers < 1:
        raise GlasslabError(f"--workers {workers} must be at least 1")
    entry = _entry(arms, entry_id or ledger.new_id())
    if arms.refusal:
        entry |= {"decision": "refused", "verdict": None, "reason": arms.refusal}
        ledger.append(path, entry)
        build_ledger_page(root)
        return entry
    t0 = time.time()
    with lab_lock(root, report):
        code = code_hash()
        timed = req.budget is not None and parse_budget(req.budget).unit == "seconds"
        # A seconds budget measures the machine's load too: its runs are this experiment's own, never reused.
        nonce = entry["id"] if timed else ""
        if timed:
            report(
                "seconds budget: noisy on a shared machine and not reproducible; arms run interleaved "
                "(a pair side by side with --workers 2) and these runs are never reused"
            )
        env: dict[str, dict[str, str]] = {}
        changed = "aa" if req.aa else ""
        if req.patch is not None:
            tree = patched_tree(req.patch, req.tree or default_tree(), root)
            env[CANDIDATE] = tree.env()
            changed = tree.patch_sha256 + tree.tree_sha256
            entry |= {"patch_sha256": tree.patch_sha256, "patch": tree.patch_text, "tree": str(tree.path)}
        ids = {
            BASELINE: arm_id(arms.baseline, req.stages, code, nonce),
            CANDIDATE: arm_id(arms.candidate, req.stages, code, nonce + changed),
        }
        entries = ledger.read(path)
        n = req.seeds
        if req.aa:  # two identical arms on independent seeds: a run never meets its own seed in the other arm
            first = ledger.fresh_seeds(entries, 2 * n)
            seeds = {BASELINE: first[:n], CANDIDATE: first[n:]}
        else:
            seeds = {BASELINE: list(range(n)), CANDIDATE: list(range(n))}
        rounds = [_round(arms, entry["id"], "screen", seeds, ids, env, root, workers, report)]
        if rounds[0]["judgement"]["verdict"] == "better":
            taken = set(seeds[BASELINE]) | set(seeds[CANDIDATE])
            fresh = ledger.fresh_seeds(entries, 2 * n if req.aa else n, taken)
            confirm = {BASELINE: fresh[:n], CANDIDATE: fresh[n:] if req.aa else fresh}
            report(f"better on seeds {seeds[CANDIDATE]}: confirming on fresh seeds {confirm[CANDIDATE]}")
            rounds.append(_round(arms, entry["id"], "confirm", confirm, ids, env, root, workers, report))
    final = rounds[-1]["judgement"]
    kept = final["verdict"] == "better"
    if kept:
        reason = f"better on the screening seeds and again on fresh seeds: {final['reason']}"
    elif len(rounds) > 1:
        reason = f"better on the screening seeds, not on fresh seeds: {final['reason']}"
    else:
        reason = final["reason"]
    entry |= {
        "decision": "kept" if kept else "discarded",
        "verdict": final["verdict"],
        "reason": reason,
        "difference": final["difference"],
        "ci95": final["ci95"],
        "p": final["p"],
        "noise_floor": rounds[0]["judgement"]["noise_floor"],
        "rounds": rounds,
        "wall_time_s": round(time.time() - t0, 1),
    }
    ledger.append(path, entry)
    build_ledger_page(root)
    return entry


def _entry(arms: Arms, entry_id: str) -> dict[str, Any]:
    req = arms.request
    return {
        "id": entry_id,
        "time": ledger.now_iso(),
        "kind": "aa" if req.aa else "experiment",
        "description": req.description,
        "git_commit": git_commit(),
        "code_hash": code_hash(),
        "patch_sha256": None,
        "patch": None,
        "tree": None,
        "base": req.base,
        "base_sets": list(req.base_sets),
        "stages": list(req.stages),
        "budget": req.budget,
        "metric": req.metric,
        "metric_stage": arms.metric_stage,
        "goal": arms.goal,
        "min_effect": req.min_effect,
        "seeds": req.seeds,
        "sets": list(req.sets),
        "changes": arms.changes,
    }


def _round(
    arms: Arms,
    entry_id: str,
    name: str,
    seeds: dict[str, list[int]],
    ids: dict[str, str],
    env: dict[str, dict[str, str]],
    root: Path,
    workers: int,
    report: Callable[[str], None],
) -> dict[str, Any]:
    from glasslab.study.aggregate import collect
    from glasslab.study.executor import execute

    plan = arms.plan(f"{entry_id}-{name}", seeds, ids, env)
    outcomes = {o.name: o for o in execute(plan, root, workers=workers, report=report)}
    results = collect(plan, root / layout.STUDY_RUNS)
    title = plan.spec.metrics[0].title
    per_arm: dict[str, dict[str, Any]] = {}
    for arm in (BASELINE, CANDIDATE):
        runs = [r for r in results if r.levels["arm"] == arm]
        per_arm[arm] = {
            "id": ids[arm],
            "runs": [
                {
                    "seed": r.seed,
                    "path": str(r.path),
                    "status": r.status,
                    "value": r.values[title],
                    "reused": outcomes[r.name].action == "skip",
                    "message": r.message,
                }
                for r in runs
            ],
        }
        per_arm[arm]["summary"] = summarize([r.values[title] for r in runs]).as_dict()
    judgement = judge(
        [r["value"] for r in per_arm[BASELINE]["runs"]],
        [r["value"] for r in per_arm[CANDIDATE]["runs"]],
        goal=arms.goal,
        min_effect=arms.request.min_effect,
    )
    report(f"{name}: {judgement.verdict}, {judgement.reason}")
    return {"round": name, "seeds": seeds, "arms": per_arm, "judgement": judgement.as_dict()}
