"""Training throughput of `tiny-moe` against `tiny`, and what the router probe adds to a step.

Usage:
    python bench/moe_throughput.py --steps 120 --chunk 10 [--threads 2] [--out FILE]

Three conditions, trained through the real loop (`glasslab.train.loop.train`) on the same data:
    tiny             the dense tiny model, probes off
    tiny-moe         the tiny-moe preset (4 experts, top-1, bias balancing), probes off
    tiny-moe+router  the same with the router probe at its default cadences (and no other probe)
They are interleaved in chunks of `--chunk` steps (each chunk resumes its condition from its checkpoint; the order
rotates), so load from other processes falls on all three alike. Step times are the loop's `time/step_s`; each
chunk's first step (just resumed) is dropped. For every chunk round, the ratio of the conditions' mean step times
is taken; reported are the median and the range of those ratios over rounds, and the median tokens/s.
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

from glasslab.config import Config, resolve  # noqa: E402
from glasslab.data.corpus import load_documents  # noqa: E402
from glasslab.data.tokenizer import Tokenizer  # noqa: E402
from glasslab.data.tokens import TokenSplits, build_token_splits  # noqa: E402
from glasslab.model.gpt import GPT  # noqa: E402
from glasslab.objectives.lm import LanguageModeling  # noqa: E402
from glasslab.probes.router import RouterProbe  # noqa: E402
from glasslab.track.metrics import MetricStore  # noqa: E402
from glasslab.track.rundir import RunDir  # noqa: E402
from glasslab.train.balance import balancing_hooks  # noqa: E402
from glasslab.train.loop import Hook, train  # noqa: E402

CONDITIONS = ("tiny", "tiny-moe", "tiny-moe+router")


def hooks_for(condition: str, cfg: Config) -> list[Hook]:
    hooks = balancing_hooks(cfg.model)
    if condition.endswith("+router"):
        p = cfg.probes
        hooks.append(RouterProbe(p.router_every, p.router_churn_every, p.router_dead_window))
    return hooks


def run_chunk(condition: str, cfg: Config, run: RunDir, tok: Tokenizer, splits: TokenSplits, end: int) -> None:
    """Train `condition` up to step `end`, resuming from its previous chunk's checkpoint."""
    train_cfg = cfg.train.model_copy(
        update={"steps": end, "schedule": "constant", "eval_every": 0, "checkpoint_every": end, "keep_last": 1}
    )
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    objective = LanguageModeling(
        splits,
        tok,
        batch_size=cfg.train.batch_size,
        block_size=cfg.model.block_size,
        eval_batches_n=2,
        z_loss=0.0,
        seed=cfg.seed,
        device=torch.device("cpu"),
        sample_tokens=4,
    )
    with MetricStore(run.metrics_db_path) as store:
        train(model, objective, train_cfg, run, store, arch=cfg.model.model_dump(), hooks=hooks_for(condition, cfg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120, help="steps per condition")
    ap.add_argument("--chunk", type=int, default=10, help="steps per interleaved chunk")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-chars", type=int, default=400_000, help="corpus characters for tokenizer and data")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    configs = {c: resolve(c.removesuffix("+router"), overrides=["probes.mode=off"]) for c in CONDITIONS}
    text = "\n\n".join(load_documents(None))[: args.max_chars]
    tok = Tokenizer.train([text], "bpe", configs["tiny"].tokenizer.vocab_size)
    for cfg in configs.values():
        cfg.model.vocab_size = tok.vocab_size
    work = Path(tempfile.mkdtemp(prefix="moe-throughput-"))
    splits = build_token_splits([text], tok, work / ".cache", 0.05, 0)
    runs = {c: RunDir.create(work / c.replace("+", "-")) for c in CONDITIONS}

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    for r, end in enumerate(range(args.chunk, args.steps + 1, args.chunk)):
        for c in CONDITIONS[r % 3 :] + CONDITIONS[: r % 3]:
            run_chunk(c, configs[c], runs[c], tok, splits, end)
        print(f"  {end}/{args.steps} steps per condition, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
    wall = time.perf_counter() - t0

    chunk_means: dict[str, np.ndarray] = {}
    tokens_per_step = configs["tiny"].train.batch_size * configs["tiny"].model.block_size
    for c in CONDITIONS:
        with MetricStore(runs[c].metrics_db_path) as store:
            steps, dt = store.series("time/step_s")
        keep = (steps - 1) % args.chunk != 0  # each chunk's first step just resumed: cold caches
        chunk = (steps[keep] - 1) // args.chunk
        chunk_means[c] = np.array([dt[keep][chunk == i].mean() for i in np.unique(chunk)])
    results = {
        c: {
            "tokens_per_s_median": float(np.median(tokens_per_step / m)),
            "step_ms_median": float(1e3 * np.median(m)),
            "step_ms_range": [float(1e3 * m.min()), float(1e3 * m.max())],
        }
        for c, m in chunk_means.items()
    }
    ratios = {
        "tiny-moe tokens/s as a share of tiny's": chunk_means["tiny"] / chunk_means["tiny-moe"],
        "router probe overhead (step time ratio - 1)": chunk_means["tiny-moe+router"] / chunk_means["tiny-moe"] - 1,
    }
    report = {
        "steps": args.steps,
        "chunk": args.chunk,
        "threads": args.threads,
        "wall_s": wall,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "results": results,
        "ratios": {
            k: {"median": float(np.median(v)), "range": [float(v.min()), float(v.max())]} for k, v in ratios.items()
        },
    }
    for c, res in results.items():
        print(
            f"{c:>16}: {res['tokens_per_s_median']:8.0f} tokens/s   step {res['step_ms_median']:.1f} ms "
            f"(chunk means {res['step_ms_range'][0]:.1f}-{res['step_ms_range'][1]:.1f})"
        )
    for k, v in report["ratios"].items():
        print(f"{k}: median {v['median']:.3f}, range over rounds {v['range'][0]:.3f} to {v['range'][1]:.3f}")
    print(f"load average before {load_before}, after {os.getloadavg()}; {wall:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
