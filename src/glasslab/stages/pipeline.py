"""The main job: every stage in one run directory, then a final held-out evaluation and the report.

Each stage starts from the previous stage's last checkpoint in the same run; a resumed pipeline skips the
stages the manifest records as done and continues the interrupted one from its checkpoint.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

from glasslab.config import Config
from glasslab.stages import get_stage
from glasslab.stages.common import load_model, setup_runtime
from glasslab.track.atomic import write_json_atomic
from glasslab.track.layout import EVAL, EVAL_FAMILY, PRETRAIN, RL, SFT, metric
from glasslab.track.metrics import MetricStore, read_metrics
from glasslab.track.rundir import RunDir


def run_pipeline(
    cfg: Config,
    run: RunDir,
    stages: list[str],
    *,
    init: Path | None = None,
    progress: Any = None,
    docs: list[str] | None = None,
) -> None:
    """Run the stages not yet done; `init` (a checkpoint dir) starts the first stage when it is not pretraining.
    `docs`: the pretraining documents, when the command's input checks loaded them."""
    done = run.read_manifest().get("stages_done", [])
    for i, stage in enumerate(stages):
        if stage in done:
            continue
        extra = {"docs": docs} if stage == "pretrain" else {}
        get_stage(stage)(cfg, run, init=init if i == 0 else None, progress=progress, **extra)


def final_evaluation(cfg: Config, run: RunDir) -> dict[str, dict]:
    """Greedy accuracy and pass@k of each trained chat stage (SFT, RL) on the same held-out problems of each RL
    environment, so the numbers before and after RL are directly comparable, and of each environment RL changed
    at SFT's options (`<env>@sft`: what RL cost there). Logged as `eval/<task>/after_<stage>/...`;
    eval/final.json holds stage -> task -> summary."""
    from glasslab.stages.rl import retention_envs, rl_env
    from glasslab.train.evaluate import evaluate_env

    device = setup_runtime(cfg.system, cfg.seed)
    # the RL tasks at the RL difficulty, so "after SFT" and "after RL" measure the same
    tasks = [(env.name, env) for env in rl_env(cfg).parts()] + retention_envs(cfg)
    results: dict[str, dict] = {}
    done = run.read_manifest().get("stages_done", [])
    with MetricStore(run.metrics_db_path) as store:
        for stage in (SFT, RL):
            if stage not in done:
                continue
            model, tok, _ = load_model(run, device, stage=stage)
            results[stage] = {}
            for task, env in tasks:
                res = evaluate_env(
                    model,
                    tok,
                    env,
                    n=cfg.eval.n,
                    seed=cfg.seed,
                    pass_k=tuple(cfg.eval.pass_k),
                    samples=cfg.eval.samples,
                    temperature=cfg.eval.temperature,
                    max_new_tokens=cfg.eval.max_new_tokens,
                    task=task,
                )
                results[stage][task] = res.as_dict()
                values = {metric(EVAL_FAMILY, task, f"after_{stage}", "accuracy"): res.accuracy}
                values |= {
                    metric(EVAL_FAMILY, task, f"after_{stage}", f"pass@{k}"): v for k, v in res.pass_at_k.items()
                }
                store.log(0, EVAL, values)
        store.compact(run.metrics_parquet_path)
    run.eval_dir.mkdir(exist_ok=True)
    write_json_atomic(run.final_eval_path, results)
    return results


def headline(run: RunDir) -> dict[str, Any]:
    """The numbers the main job ends with."""
    table = read_metrics(run.path).to_pylist()
    last: dict[tuple[str, str], float] = {}
    for row in table:
        last[(row["stage"], row["name"])] = row["value"]
    out: dict[str, Any] = {"run": str(run.path), "val_bpb": last.get((PRETRAIN, "val/bpb"))}
    for (stage, name), value in last.items():
        if stage == EVAL and name.endswith("/accuracy"):
            out[name] = value
    manifest = run.read_manifest()
    out |= {k: manifest.get(k) for k in ("status", "wall_time_s", "peak_rss_mb", "report")}
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def finalize(cfg: Config, run: RunDir, *, report: bool, started: float) -> dict[str, Any]:
    """After the last stage: held-out evaluation of the chat stages, the report, the headline numbers. The
    manifest gets the job's wall time (summed over resumed sessions; `started` is this session's time.time())
    and its peak memory."""
    manifest = run.read_manifest()
    if {SFT, RL} & set(manifest.get("pipeline", [])):
        final_evaluation(cfg, run)

    def record_resources() -> None:
        run.update_manifest(
            wall_time_s=manifest.get("wall_time_s", 0.0) + time.time() - started,
            peak_rss_mb=max(manifest.get("peak_rss_mb", 0.0), peak_rss_mb()),
        )

    record_resources()
    run.set_status("completed")  # before the report, which shows the status
    if report:
        from glasslab.report import build_report

        run.update_manifest(report=str(build_report(run.path)))
        record_resources()
    return headline(run)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
