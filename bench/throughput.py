"""Training-step throughput (tokens/s) of glasslab on CPU, optionally side by side with nanoGPT's own model.

Two shapes: nanoGPT's CPU shape (4 layers, 4 heads, width 128, context 64, batch 12, character vocabulary),
and the `tiny` preset; each in float32 and under `system.precision = "auto"` (bfloat16 autocast where the CPU
has bf16 dot products), with and without torch.compile. A step is what the training loop does: draw a batch,
forward, backward, clip, optimizer step.

With `--nanogpt DIR` (a checkout of karpathy/nanoGPT), nanoGPT's `model.py` is imported from DIR and its
training step (its GPT, its `configure_optimizers`, float32 as its train.py runs on CPU, clip 1.0) is timed at
its CPU shape in the same process, eager (its README's CPU setting) and compiled. Variants are timed in interleaved
rounds, so a change in machine load hits every variant alike; the figure is the median step time over all rounds,
with the range of the per-round medians.

The variant glasslab trains with at default settings (`system.compile = "auto"`, glasslab.train.compiling: it
depends on whether this machine's inductor caches are warm for the shape) for a pretraining run of `--run-steps`
steps is reported as `defaults_vs_nanoGPT`, in each precision.

    python bench/throughput.py [--nanogpt DIR] [--rounds 5] [--steps 40] [--out bench/results/throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from glasslab.config import resolve
from glasslab.data.corpus import load_documents
from glasslab.data.tokenizer import Tokenizer
from glasslab.data.tokens import BatchSampler, build_token_splits
from glasslab.model.gpt import GPT
from glasslab.objectives.lm import LanguageModeling
from glasslab.train.compiling import compiled, should_compile
from glasslab.train.optim import build_optimizer
from glasslab.train.precision import autocast_dtype

NANO_SHAPE = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64", "train.batch_size=12"]


def glasslab_step(cfg, sampler: BatchSampler, precision: str, compile_: bool) -> Callable[[], None]:
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.train)
    fwd = compiled(model) if compile_ else model
    amp = autocast_dtype(precision, "cpu")

    def step() -> None:
        x, y = sampler.next_batch()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(fwd(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def nanogpt_step(nanogpt: Path, vocab: int, sampler: BatchSampler, compile_: bool) -> Callable[[], None]:
    """nanoGPT's train.py step at its README CPU settings (dropout 0, bias on, lr 1e-3, betas (0.9, 0.99)),
    optionally through torch.compile as its `--compile=True` does."""
    sys.path.insert(0, str(nanogpt))
    from model import GPT as NanoGPT  # noqa: PLC0415 (nanoGPT's own model.py)
    from model import GPTConfig

    torch.manual_seed(0)
    model = NanoGPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=4, n_head=4, n_embd=128, dropout=0.0))
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    fwd = torch.compile(model) if compile_ else model

    def step() -> None:
        x, y = sampler.next_batch()
        _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout, to time its step side by side")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--eager-only", action="store_true", help="leave out the compiled variants (and their compiling)")
    ap.add_argument("--run-steps", type=int, default=2000, help="the pretraining run whose defaults are reported")
    ap.add_argument("--shapes", nargs="+", default=["nanogpt_shape", "tiny_preset"])
    ap.add_argument("--out", type=Path, default=Path("bench/results/throughput.json"))
    args = ap.parse_args()
    docs = load_documents(None)
    results: dict = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_before": os.getloadavg(),
        "auto_precision": str(autocast_dtype("auto", "cpu") or torch.float32),
    }
    with tempfile.TemporaryDirectory() as cache:
        char = Tokenizer.train(docs, "char", 0)
        tiny = resolve("tiny")
        bpe = Tokenizer.train(docs, "bpe", tiny.tokenizer.vocab_size)
        shapes = {"nanogpt_shape": (resolve("tiny", overrides=NANO_SHAPE), char), "tiny_preset": (tiny, bpe)}
        steps: dict[str, tuple[Callable[[], None], int]] = {}
        for name in args.shapes:
            cfg, tok = shapes[name]
            cfg.model.vocab_size = tok.vocab_size
            splits = build_token_splits(docs, tok, Path(cache), 0.05, 0)
            tokens = cfg.train.batch_size * cfg.model.block_size
            for precision in ("float32", "auto"):
                for compile_ in (False,) if args.eager_only else (False, True):
                    sampler = BatchSampler(splits.train, cfg.train.batch_size, cfg.model.block_size, 0)
                    label = f"{name}/{precision}{'/compiled' if compile_ else ''}"
                    steps[label] = (glasslab_step(cfg.model_copy(deep=True), sampler, precision, compile_), tokens)
            if name == "nanogpt_shape" and args.nanogpt:
                for compile_ in (False,) if args.eager_only else (False, True):
                    sampler = BatchSampler(splits.train, 12, 64, 0)
                    label = f"nanogpt_shape/nanoGPT{'/compiled' if compile_ else ''}"
                    steps[label] = (nanogpt_step(args.nanogpt, tok.vocab_size, sampler, compile_), tokens)
    for label, (step, _) in steps.items():  # warm-up (and compilation) outside the timed rounds
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        results.setdefault("warmup_s", {})[label] = time.perf_counter() - t0
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(args.rounds):
        for label, (step, _) in steps.items():
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                times[label].append(time.perf_counter() - t0)
    for label, (_, tokens) in steps.items():
        median = statistics.median(times[label])
        rounds = [statistics.median(times[label][r * args.steps : (r + 1) * args.steps]) for r in range(args.rounds)]
        results[label] = {
            "median_step_ms": median * 1e3,
            "round_medians_ms": [t * 1e3 for t in rounds],
            "tokens_per_s": tokens / median,
            "tokens_per_step": tokens,
        }
        print(f"{label:36s} {tokens / median:9.0f} tok/s  ({median * 1e3:.2f} ms/step)")
    for ref in ("nanogpt_shape/nanoGPT", "nanogpt_shape/nanoGPT/compiled"):
        if ref in results:
            key = "vs_" + ref.split("/", 1)[1].replace("/", "_")
            for label in steps:
                if label.startswith("nanogpt_shape/"):
                    results[label][key] = results[label]["tokens_per_s"] / results[ref]["tokens_per_s"]
            print(f"{key}:", {k: round(v[key], 2) for k, v in results.items() if isinstance(v, dict) and key in v})
    cfg = shapes["nanogpt_shape"][0]
    nano = results.get("nanogpt_shape/nanoGPT")
    for precision in ("float32", "auto"):
        compile_default = should_compile("auto", LanguageModeling, "cpu", args.run_steps)
        label = f"nanogpt_shape/{precision}{'/compiled' if compile_default else ''}"
        if nano and label in results:
            # per round, so the range shows how much the machine's load moved the ratio
            ratios = [n / g for g, n in zip(results[label]["round_medians_ms"], nano["round_medians_ms"])]
            results[f"defaults_vs_nanoGPT/{precision}"] = {
                "variant": label,
                "median": results[label]["vs_nanoGPT"],
                "round_range": [min(ratios), max(ratios)],
            }
            median = results[label]["vs_nanoGPT"]
            print(f"defaults ({label}) vs nanoGPT eager: {median:.2f}x, rounds {min(ratios):.2f}-{max(ratios):.2f}")
    results["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
