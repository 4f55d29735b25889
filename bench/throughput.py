"""Training-step throughput (tokens/s) of glasslab on CPU.

Two shapes: nanoGPT's CPU shape (4 layers, 4 heads, width 128, context 64, batch 12, character vocabulary),
and the `tiny` preset; each with and without torch.compile. A step is what the training loop does: draw a
batch, forward, backward, clip, optimizer step. Reports the median over timed steps after warm-up.

    python bench/throughput.py [--steps 200] [--out bench/results/throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from glasslab.config import TrainConfig, resolve
from glasslab.data.corpus import load_documents
from glasslab.data.tokenizer import Tokenizer
from glasslab.data.tokens import BatchSampler, build_token_splits
from glasslab.model.gpt import GPT
from glasslab.train.optim import build_optimizer


def shapes(docs: list[str], cache: Path) -> dict[str, tuple]:
    char = Tokenizer.train(docs, "char", 0)
    tiny = resolve("tiny")
    bpe = Tokenizer.train(docs, "bpe", tiny.tokenizer.vocab_size)
    nano = resolve("tiny", overrides=["model.n_layer=4", "model.n_head=4", "model.n_embd=128", "model.block_size=64",
                                      "train.batch_size=12"])  # fmt: skip
    return {
        "nanogpt_shape": (nano, build_token_splits(docs, char, cache, 0.05, 0), char.vocab_size),
        "tiny_preset": (tiny, build_token_splits(docs, bpe, cache, 0.05, 0), bpe.vocab_size),
    }


def measure(cfg, splits, vocab: int, steps: int, warmup: int, compile_: bool) -> dict:
    torch.manual_seed(0)
    cfg.model.vocab_size = vocab
    model = GPT(cfg.model)
    opt = build_optimizer(model, TrainConfig(**{**cfg.train.model_dump()}))
    fwd = torch.compile(model) if compile_ else model
    sampler = BatchSampler(splits.train, cfg.train.batch_size, cfg.model.block_size, 0)
    times = []
    t_start = time.perf_counter()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        x, y = sampler.next_batch()
        loss = F.cross_entropy(fwd(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        elif i == warmup - 1:
            warm_s = time.perf_counter() - t_start
    step = statistics.median(times)
    tokens = cfg.train.batch_size * cfg.model.block_size
    return {"compile": compile_, "params": model.num_params(), "tokens_per_step": tokens, "median_step_ms": step * 1e3,
            "tokens_per_s": tokens / step, "warmup_s": warm_s}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/results/throughput.json"))
    args = ap.parse_args()
    docs = load_documents(None)
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as cache:
        for name, (cfg, splits, vocab) in shapes(docs, Path(cache)).items():
            for compile_ in (False, True):
                r = measure(cfg.model_copy(deep=True), splits, vocab, args.steps, args.warmup, compile_)
                results[f"{name}{'_compiled' if compile_ else ''}"] = r
                print(f"{name:14s} compile={compile_!s:5s} {r['tokens_per_s']:9.0f} tok/s  ({r['median_step_ms']:.2f} ms/step)")
    results["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
