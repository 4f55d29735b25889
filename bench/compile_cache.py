"""What torch.compile costs a run, with inductor's on-disk caches cold and warm.

Each run is a fresh process (no in-memory cache) that builds the model at a shape, compiles it as `train()` does
(glasslab.train.compiling: the FX graph and AOTAutograd caches on, in the cache directory given) and times the
first training step (compilation included) and the median of the next steps, in wall time and in CPU time (the
process's and its compiler subprocesses'; on a busy machine the CPU time is the steadier figure). The first run of a shape starts
from an empty cache directory; the runs after it find the compiled graphs there. `--eager` times the same
steps without compiling, to show how many steps a compilation takes to pay for itself.

    python bench/compile_cache.py [--shape nanogpt|tiny] [--runs 3] [--precision auto|float32]
        [--out bench/results/compile_cache.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NANO_SHAPE = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64", "train.batch_size=12"]


def child(shape: str, precision: str, compile_: bool, steps: int) -> dict:
    """One process's measurement (run with --child)."""
    import torch
    import torch.nn.functional as F

    from glasslab.config import resolve
    from glasslab.model.gpt import GPT
    from glasslab.train.compiling import compiled
    from glasslab.train.optim import build_optimizer
    from glasslab.train.precision import autocast_dtype

    cfg = resolve("tiny", overrides=NANO_SHAPE if shape == "nanogpt" else [])
    cfg.model.vocab_size = 65 if shape == "nanogpt" else cfg.tokenizer.vocab_size
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.train)
    fwd = compiled(model) if compile_ else model
    amp = autocast_dtype(precision, "cpu")
    B, T = cfg.train.batch_size, cfg.model.block_size
    times, cpu = [], []
    for _ in range(steps):
        x = torch.randint(0, cfg.model.vocab_size, (B, T))
        t0, c0 = time.perf_counter(), cpu_s()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(fwd(x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_s() - c0)
    return {
        "first_step_s": times[0],
        "median_step_s": statistics.median(times[1:]),
        "first_step_cpu_s": cpu[0],
        "median_step_cpu_s": statistics.median(cpu[1:]),
    }


def cpu_s() -> float:
    """CPU seconds of this process and of its finished subprocesses (inductor's C++ compiler)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["nanogpt", "tiny"], default="nanogpt")
    ap.add_argument("--precision", choices=["auto", "float32"], default="auto")
    ap.add_argument("--runs", type=int, default=3, help="compiled runs sharing one cache directory")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/compile_cache.json"))
    ap.add_argument("--child", nargs=3, metavar=("SHAPE", "PRECISION", "COMPILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        shape, precision, compile_ = args.child
        print(json.dumps(child(shape, precision, compile_ == "1", args.steps)))
        return
    results: dict = {"shape": args.shape, "precision": args.precision, "load_before": os.getloadavg(), "runs": []}
    with tempfile.TemporaryDirectory() as cache:
        # one compile thread: inductor compiles in-process, so its C++ compiler runs are counted in the CPU time
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
        for i in range(args.runs + 1):
            compile_ = i < args.runs
            cmd = [sys.executable, __file__, "--child", args.shape, args.precision, "1" if compile_ else "0"]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            run = {"compiled": compile_, "cache": ("cold" if i == 0 else "warm") if compile_ else None}
            run |= json.loads(out.strip().splitlines()[-1]) | {"process_s": time.perf_counter() - t0}
            results["runs"].append(run)
            print(run)
    results["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
