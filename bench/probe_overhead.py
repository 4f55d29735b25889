"""What the probes cost: training step time with probes off, at the default cadences, and with `--probes full`.

Usage:
    python bench/probe_overhead.py --steps 200 --chunk 10 --out /tmp/probe_overhead.json

The `tiny` preset model and the pretraining objective are built directly and trained through the real loop
(`glasslab.train.loop.train`). The three conditions are interleaved in chunks of `--chunk` steps (each chunk
resumes its condition from its checkpoint, in a rotating order), so load from other processes on a shared
machine falls on all three alike. Step times are the loop's own `time/step_s` (from the start of a step to
the end of its hooks; evaluation and checkpoints are outside it).

Probes at a cadence run on a few steps only, so the cost that matters is the MEAN step time (= throughput);
the median shows the cost of an ordinary (non-probe) step. On a loaded machine the A/B difference of step
times is noisy, so every probe hook is also timed inside the loop: `probe_ms` is the time spent in probe
hooks per step, and `probe_overhead` = probe time / (step time - probe time) is the throughput cost it implies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from glasslab.config import ModelConfig, resolve  # noqa: E402
from glasslab.data.corpus import load_documents  # noqa: E402
from glasslab.data.tokenizer import Tokenizer  # noqa: E402
from glasslab.data.tokens import TokenSplits, build_token_splits  # noqa: E402
from glasslab.model.gpt import GPT  # noqa: E402
from glasslab.objectives.lm import LanguageModeling  # noqa: E402
from glasslab.probes import build_probes  # noqa: E402
from glasslab.track.metrics import MetricStore  # noqa: E402
from glasslab.track.rundir import RunDir  # noqa: E402
from glasslab.train.loop import Hook, StepContext, train  # noqa: E402

MODES = ("off", "default", "full")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="steps per condition")
    ap.add_argument("--chunk", type=int, default=10, help="steps per interleaved chunk")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = least sensitive to other load)")
    ap.add_argument("--max-chars", type=int, default=400_000, help="corpus characters for tokenizer and data")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg = resolve("tiny")
    text = "\n\n".join(load_documents(None))[: args.max_chars]
    tok = Tokenizer.train([text], cfg.tokenizer.kind, cfg.tokenizer.vocab_size)
    cfg.model.vocab_size = tok.vocab_size
    work = Path(tempfile.mkdtemp(prefix="probe-overhead-"))
    splits = build_token_splits([text], tok, work / ".cache", cfg.data.val_fraction, cfg.seed)
    runs = {mode: RunDir.create(work / mode) for mode in MODES}

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    for r, end in enumerate(range(args.chunk, args.steps + 1, args.chunk)):
        for mode in MODES[r % 3 :] + MODES[: r % 3]:  # rotate who goes first
            run_chunk(cfg.model, mode, runs[mode], tok, splits, end)
        print(f"  {end}/{args.steps} steps per condition, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    wall = time.perf_counter() - t0

    results = {}
    for mode in MODES:
        with MetricStore(runs[mode].metrics_db_path) as store:
            steps, dt = store.series("time/step_s")
        keep = (steps - 1) % args.chunk != 0  # drop each chunk's first step (just resumed: cold caches)
        steps, dt = steps[keep], dt[keep]
        spent = PROBE_SECONDS[mode]
        by_probe = {name: np.array([per_step.get(int(s), 0.0) for s in steps]) for name, per_step in spent.items()}
        probe = sum(by_probe.values(), np.zeros(len(steps)))
        results[mode] = {
            "steps": len(dt),
            "mean_ms": 1e3 * dt.mean(),
            "median_ms": 1e3 * np.median(dt),
            "p90_ms": 1e3 * np.quantile(dt, 0.9),
            "probe_ms": 1e3 * probe.mean(),
            "probe_ms_by_probe": {name: 1e3 * v.mean() for name, v in by_probe.items()},
            "probe_overhead": probe.sum() / (dt.sum() - probe.sum()),
        }
    base = results["off"]
    for mode in MODES:
        results[mode]["mean_vs_off"] = results[mode]["mean_ms"] / base["mean_ms"]
        results[mode]["median_vs_off"] = results[mode]["median_ms"] / base["median_ms"]
    report = {
        "model": cfg.model.model_dump(),
        "batch_size": cfg.train.batch_size,
        "threads": args.threads,
        "probes_default": cfg.probes.model_dump(),
        "chunk": args.chunk,
        "wall_s": wall,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "results": results,
    }
    for mode, r in results.items():
        print(
            f"{mode:>8}: mean {r['mean_ms']:7.1f} ms ({r['mean_vs_off']:.3f}x)   median {r['median_ms']:7.1f} ms "
            f"({r['median_vs_off']:.3f}x)   p90 {r['p90_ms']:7.1f} ms   in probe hooks {r['probe_ms']:6.2f} ms/step "
            f"= +{100 * r['probe_overhead']:.2f}%   n={r['steps']}"
        )
        if r["probe_ms_by_probe"]:
            print("          " + ", ".join(f"{k} {v:.2f}" for k, v in r["probe_ms_by_probe"].items()) + " ms/step")
    print(f"load average before {load_before}, after {os.getloadavg()}; {wall:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def run_chunk(model_cfg: ModelConfig, mode: str, run: RunDir, tok: Tokenizer, splits: TokenSplits, end: int) -> None:
    """Train condition `mode` up to step `end`, resuming from its previous chunk's checkpoint."""
    cfg = resolve("tiny", overrides=[f"probes.mode={mode}"])
    cfg.train = cfg.train.model_copy(
        update={"steps": end, "schedule": "constant", "eval_every": 0, "checkpoint_every": end, "keep_last": 1}
    )
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg)
    objective = LanguageModeling(
        splits,
        tok,
        batch_size=cfg.train.batch_size,
        block_size=model_cfg.block_size,
        eval_batches_n=2,
        z_loss=0.0,
        seed=cfg.seed,
        device=torch.device("cpu"),
        sample_tokens=4,
    )
    with MetricStore(run.metrics_db_path) as store:
        hooks = [Timed(h, PROBE_SECONDS[mode].setdefault(type(h).__name__, {})) for h in build_probes(cfg, run, tok)]
        train(model, objective, cfg.train, run, store, arch=model_cfg.model_dump(), hooks=hooks)


PROBE_SECONDS: dict[str, dict[str, dict[int, float]]] = {mode: {} for mode in MODES}  # mode -> probe -> step -> s


class Timed(Hook):
    """Passes every call on to a probe, adding the time spent in the per-step calls to the step they belong to."""

    def __init__(self, inner: Hook, seconds: dict[int, float]) -> None:
        self.inner, self.seconds = inner, seconds

    def _timed(self, method: str, ctx: StepContext, step: int) -> None:
        t0 = time.perf_counter()
        getattr(self.inner, method)(ctx)
        self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - t0

    def on_step_start(self, ctx: StepContext) -> None:
        self._timed("on_step_start", ctx, ctx.step + 1)

    def on_backward(self, ctx: StepContext) -> None:
        self._timed("on_backward", ctx, ctx.step + 1)

    def on_optimizer_step(self, ctx: StepContext) -> None:
        self._timed("on_optimizer_step", ctx, ctx.step)  # the loop has already counted this step

    def on_train_start(self, ctx: StepContext) -> None:
        self.inner.on_train_start(ctx)

    def on_eval(self, ctx: StepContext) -> None:
        self.inner.on_eval(ctx)

    def on_train_end(self, ctx: StepContext) -> None:
        self.inner.on_train_end(ctx)

    def on_nonfinite(self, ctx: StepContext) -> None:
        self.inner.on_nonfinite(ctx)


if __name__ == "__main__":
    main()
