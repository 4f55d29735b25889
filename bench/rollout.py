"""Rollout and GRPO step speed at the `tiny` model size: G=8 completions x 8 prompts x 24 new tokens.

Usage:
    python bench/rollout.py --out bench/results/rollout.json              # random-init tiny model
    python bench/rollout.py --run runs/chat --out bench/results/rollout-chat.json   # a trained chat model

A random model never says <|end|>, so every completion runs to the 24-token cap (the worst case for
generation); a trained chat model answers arithmetic in a few tokens and stops. Measured:
  rollout         one batched KV-cache generate() call for all 64 completions, plus scoring (GRPO's path)
  unbatched       the same 64 completions one prompt at a time (KV cache, no batching): what batching buys
  grpo step       next_batch (rollout + reference log-probs) + loss + backward + clip + AdamW step,
                  with the time split the run logs (time/generation_s, time/reference_s, the rest)
  old log-probs   one no-grad policy forward over the batch: what num_iterations > 1 would cost per rollout
                  batch if the log-probs recorded while sampling (temperature 1) were not reused
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from glasslab.config import resolve  # noqa: E402
from glasslab.data.corpus import load_documents  # noqa: E402
from glasslab.data.tokenizer import Tokenizer  # noqa: E402
from glasslab.envs import get_env  # noqa: E402
from glasslab.model.generate import generate  # noqa: E402
from glasslab.model.gpt import GPT  # noqa: E402
from glasslab.objectives.grpo import GRPO  # noqa: E402
from glasslab.rl.batch import pack  # noqa: E402
from glasslab.rl.logprobs import sequence_logprobs  # noqa: E402
from glasslab.stages.common import load_model  # noqa: E402
from glasslab.track.rundir import RunDir  # noqa: E402
from glasslab.train.optim import build_optimizer  # noqa: E402
from glasslab.train.precision import autocast_dtype  # noqa: E402


def models(run: str | None) -> tuple[GPT, GPT, Tokenizer, str]:
    if run:
        model, tok, _ = load_model(RunDir.open(Path(run)))
        ref, _, _ = load_model(RunDir.open(Path(run)))
        return model.train(), ref.requires_grad_(False), tok, f"checkpoint of {run}"
    text = "\n\n".join(load_documents(None))[:300_000]
    tok = Tokenizer.train([text], "bpe", 2048)
    cfg = resolve("tiny").model
    cfg.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model, ref = GPT(cfg), GPT(cfg)
    ref.load_state_dict(model.state_dict())
    return model, ref.eval().requires_grad_(False), tok, "random-init tiny model"


def grpo_steps(
    objective: GRPO, model: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int, amp: torch.dtype | None
) -> list[dict]:
    """n GRPO steps as the training loop runs them (under autocast to `amp`, as system.precision sets it), each
    with the time split the run logs."""
    steps = []
    for _ in range(n):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            batch = objective.next_batch(model)
            loss, parts = objective.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = time.perf_counter() - t0
        gen, ref = parts["time/generation_s"], parts["time/reference_s"]
        record = {
            "step_s": total,
            "generation_s": gen,
            "reference_s": ref,
            "rest_s": total - gen - ref,
            "tokens": objective.batch_tokens(batch),
        }
        if "time/rollout_wait_s" in parts:  # generating ahead: sampling and the reference's scoring overlap the step
            wait = parts["time/rollout_wait_s"]
            record |= {
                "rollout_wait_s": wait,
                "rest_s": total - wait,
                "reference_scored_ahead": parts["rl/reference_scored_ahead"],
            }
        steps.append(record)
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a chat run to load (default: a random-init tiny model)")
    ap.add_argument("--reps", type=int, default=10, help="timed rollouts and GRPO steps")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"], help="as system.precision")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, ref, tok, source = models(args.run)
    cfg = resolve("tiny")
    # A random model never stops, so every completion is truncated: with mask_truncated (the recipe's default)
    # the step would train on nothing. Keep them, as bench/trl_grpo.py does.
    rl = cfg.rl.model_copy(
        update={
            "group_size": 8,
            "prompts_per_step": 8,
            "max_new_tokens": 24,
            "grpo": cfg.rl.grpo.model_copy(update={"drop_zero_std": False, "mask_truncated": False}),
        }
    )
    env = get_env("arithmetic", cfg.envs.get("arithmetic"))
    objective = GRPO(env, tok, ref, rl, cfg.eval, seed=0, device=torch.device("cpu"))
    optimizer = build_optimizer(model, rl.train)
    objective.rollout(model)  # warm-up

    rollouts = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        r = objective.rollout(model)
        rollouts.append((time.perf_counter() - t0, r.generation_s, sum(map(len, r.completions))))

    t0 = time.perf_counter()
    unbatched_tokens = 0
    for prompt in r.prompts:
        out = generate(
            model,
            [prompt],
            rl.max_new_tokens,
            stop_ids=(tok.end_id,),
            pad_id=tok.pad_id,
            seed=0,
            interceptor=objective.interceptor,
        )
        unbatched_tokens += len(out.tokens[0])
    unbatched_s = time.perf_counter() - t0

    packed = pack(r.prompts, r.completions, r.sampled, tok.pad_id, torch.device("cpu"))
    t0 = time.perf_counter()
    with torch.no_grad():
        sequence_logprobs(model, packed, 1.0)
    old_logprob_s = time.perf_counter() - t0

    amp = autocast_dtype(args.precision, "cpu")
    steps = grpo_steps(objective, model, optimizer, args.reps, amp)

    med = statistics.median
    result = {
        "model": source,
        "params": model.num_params(),
        "group_size": rl.group_size,
        "prompts": rl.prompts_per_step,
        "max_new_tokens": rl.max_new_tokens,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "grpo_step_dtype": str(amp or torch.float32).removeprefix("torch."),
        "rollout_tokens_per_s": sum(t for *_, t in rollouts) / sum(g for _, g, _ in rollouts),
        "rollout_median_s": med(s for s, _, _ in rollouts),
        "rollout_tokens_mean": statistics.mean(t for *_, t in rollouts),
        "unbatched_tokens_per_s": unbatched_tokens / unbatched_s,
        "old_logprob_forward_s": old_logprob_s,
        "grpo_steps_per_s": 1 / med(s["step_s"] for s in steps),
        "grpo_step_median_s": {
            k: med(s[k] for s in steps) for k in ("step_s", "generation_s", "reference_s", "rest_s")
        },
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
