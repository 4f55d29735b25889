"""The spike detector measured as a detector: false alarms on healthy runs, and injected faults caught.

Usage:
    .venv/bin/python bench/spike_detection.py healthy runs/s1337 runs/s0 [--set probes.KEY=VALUE ...]
    .venv/bin/python bench/spike_detection.py faults [--seeds 0 1] [--set probes.KEY=VALUE ...] [--replay]

`healthy` replays the detector (`glasslab.probes.spikes.SpikeRule`, as the `probes` config describes it: the
defaults, plus any --set) over the loss and pre-clip gradient-norm series each finished run logged
(`train/loss`, `optim/grad_norm`), stage by stage. SFT's batch kinds are not logged: they are rebuilt from the
run's config, which fixes the batch order. A run's own events.jsonl is counted too (`logged`), so a replay of
the rule the run trained with can be checked against what it recorded.

`faults` trains short pretraining runs (`--preset`, smoke by default: its model is small enough to give the
number of faults a rate needs on a shared CPU; `--steps` and `--warmup`, cosine schedule), one per seed and
fault kind, through the real loop with the real `SpikeProbe`, injecting a fault at each of `--at` (by hooks
and an objective wrapper defined here, not in the library):
    lr       the learning rate LR_FACTOR x its peak (train.lr) for LR_STEPS steps
    repeat   BAD_ROWS rows of the batch become one token repeated
    random   BAD_ROWS rows of the batch become uniformly random tokens
    grad     one block's gradient (blocks.{seed + i mod n_layer}) x GRAD_FACTOR, before the probe sees it
A fault is caught if a spike event starts 0-5 steps after the fault's first step. Its attribution is right if
the dossier's `first_departure` names the corrupted block (grad), its top rows are the corrupted rows (repeat,
random), or it is caught at all (lr: no block or row is at fault). Events outside those windows are false alarms.
Finished fault runs are reused when they were trained with the same rule and settings (else retrained);
`--replay` scores the logged series of existing runs with the --set rule instead, without training (catch and
delay only: no dossiers).

Prints JSON. healthy: {"rule": {...}, "runs": [{"run", "stage", "steps", "events", "event_steps", "logged"}],
"total_events"}. faults: {"rule", "faults": [{"kind", "seed", "at", "caught", "delay", "attributed", "event_step",
"named"}], "by_kind": {kind: {"n", "caught", "attributed"}}, "n", "caught_within_5", "caught_and_attributed",
"false_alarms"}; with --replay, attribution is null. Delays are in steps after the fault's first step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from glasslab.config import Config, ProbesConfig, build_config, load_toml, resolve  # noqa: E402
from glasslab.data.tokenizer import Tokenizer  # noqa: E402
from glasslab.data.tokens import build_token_splits  # noqa: E402
from glasslab.model.gpt import GPT  # noqa: E402
from glasslab.objectives.lm import LanguageModeling  # noqa: E402
from glasslab.probes.spikes import SpikeProbe, rule_of  # noqa: E402
from glasslab.stages.common import documents, setup_runtime  # noqa: E402
from glasslab.stages.sft import build_objective  # noqa: E402
from glasslab.track.metrics import MetricStore, read_metrics  # noqa: E402
from glasslab.track.rundir import RunDir  # noqa: E402
from glasslab.train.loop import Hook, StepContext, train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "spike_detection"
KINDS = ("lr", "repeat", "random", "grad")
WITHIN = 5  # steps after a fault's first step within which a spike event counts as catching it
LR_FACTOR, LR_STEPS = 10.0, 3
GRAD_FACTOR = 10.0
BAD_ROWS = [1, 6]  # of a batch of 8 (smoke) or 16 (tiny)
STAGE_TRAIN = {"pretrain": "train", "sft": "sft", "rl": "rl"}


def probes_config(overrides: list[str]) -> ProbesConfig:
    """The rule under test: ProbesConfig's defaults with `--set probes.KEY=VALUE` overrides."""
    return resolve(preset=None, overrides=overrides).probes


def replay(probes: ProbesConfig, loss: np.ndarray, grad: np.ndarray, kinds: list[str], warmup: int) -> list[int]:
    """The steps (1-based) at which the rule starts an episode, fed the series as the probe would be."""
    rule = rule_of(probes)
    rule.warmup = warmup if probes.spike_skip_warmup else 0
    onsets = []
    for i, (value, norm, kind) in enumerate(zip(loss, grad, kinds)):
        _, onset = rule.observe(i + 1, kind, {"loss": float(value), "grad_norm": float(norm)})
        if onset:
            onsets.append(i + 1)
    return onsets


def stage_series(path: Path, stage: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, loss, pre-clip gradient norm) a run logged for one stage, one entry per step."""
    out = []
    for name in ("train/loss", "optim/grad_norm"):
        table = read_metrics(path, names=[name], stage=stage)
        out.append((table["step"].to_numpy(), table["value"].to_numpy()))
    (steps, loss), (grad_steps, grad) = out
    if not np.array_equal(steps, grad_steps) or not np.array_equal(steps, np.arange(1, len(steps) + 1)):
        raise SystemExit(f"{path} {stage}: train/loss and optim/grad_norm are not logged once per step from step 1")
    return steps, loss, grad


def sft_kinds(path: Path, cfg: Config, steps: int) -> list[str]:
    """SFT's batch kinds, step by step: the objective's batch order depends on the config and seed only."""
    tok = Tokenizer.load(path / "tokenizer.json")
    objective = build_objective(cfg, tok, torch.device("cpu"), path.parent / ".cache")
    return [objective.batch_kind(objective.next_batch(None)) for _ in range(steps)]


def healthy(args: argparse.Namespace) -> dict[str, Any]:
    probes = probes_config(args.set)
    rows = []
    for path in map(Path, args.runs):
        cfg = build_config(load_toml(path / "config.toml"))
        logged = RunDir.open(path).events()
        for stage in STAGE_TRAIN:
            steps, loss, grad = stage_series(path, stage)
            if not len(steps):
                continue
            train_cfg = getattr(cfg, STAGE_TRAIN[stage]).train if stage != "pretrain" else cfg.train
            kinds = sft_kinds(path, cfg, len(steps)) if stage == "sft" else [""] * len(steps)
            onsets = replay(probes, loss, grad, kinds, train_cfg.warmup_steps)
            rows.append(
                {
                    "run": str(path),
                    "stage": stage,
                    "steps": len(steps),
                    "events": len(onsets),
                    "event_steps": onsets,
                    "logged": sum(e["kind"] == "spike" and e.get("stage") == stage for e in logged),
                }
            )
    return {"rule": probes.model_dump(), "runs": rows, "total_events": sum(r["events"] for r in rows)}


class FaultyData:
    """The pretraining objective, except that the batches of the listed steps get BAD_ROWS rows of `kind`
    (one token repeated, or uniformly random tokens) in their inputs and targets alike."""

    def __init__(self, inner: LanguageModeling, kind: str, at: list[int], seed: int) -> None:
        self.inner, self.kind, self.at, self.drawn = inner, kind, set(at), 0
        self.rng = torch.Generator().manual_seed(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def next_batch(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        x, y = self.inner.next_batch(model)
        self.drawn += 1
        if self.drawn not in self.at:
            return x, y
        window = torch.cat([x, y[:, -1:]], 1)
        vocab, width = self.inner.tokenizer.vocab_size, window.size(1)
        for r in BAD_ROWS:
            if self.kind == "repeat":
                window[r] = torch.randint(0, vocab, (1,), generator=self.rng).expand(width)
            else:
                window[r] = torch.randint(0, vocab, (width,), generator=self.rng)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()


class Fault(Hook):
    """Learning rate LR_FACTOR x its peak for LR_STEPS steps from each fault step, or one block's gradient x GRAD_FACTOR
    at each fault step (the hook comes before the probe, so the probe sees the corrupted gradient)."""

    def __init__(self, kind: str, at: list[int], blocks: list[int]) -> None:
        self.kind, self.at, self.blocks = kind, at, blocks

    def on_step_start(self, ctx: StepContext) -> None:
        step = ctx.step + 1
        if self.kind == "lr" and any(a <= step < a + LR_STEPS for a in self.at):
            for group in ctx.optimizer.param_groups:
                group["lr"] = group["base_lr"] * LR_FACTOR

    def on_backward(self, ctx: StepContext) -> None:
        step = ctx.step + 1
        if self.kind == "grad" and step in self.at:
            block = ctx.model.blocks[self.blocks[self.at.index(step)]]
            for p in block.parameters():
                if p.grad is not None:
                    p.grad.mul_(GRAD_FACTOR)


def fault_config(args: argparse.Namespace) -> Config:
    return resolve(
        args.preset,
        overrides=[
            f"train.steps={args.steps}",
            f"train.warmup_steps={args.warmup}",
            "train.eval_every=0",
            f"train.checkpoint_every={args.steps}",
            "system.threads=1",
        ],
    )


def fault_blocks(seed: int, n: int, n_layer: int) -> list[int]:
    return [(seed + i) % n_layer for i in range(n)]


def fault_run(path: Path, kind: str, seed: int, args: argparse.Namespace, probes: ProbesConfig) -> None:
    """Train one pretraining run with `kind` faults at args.at, unless one with the same settings and rule is
    there already."""
    marker = {
        "kind": kind,
        "seed": seed,
        "at": args.at,
        "steps": args.steps,
        "preset": args.preset,
        "warmup": args.warmup,
        "rule": probes.model_dump(),
    }
    if (path / "done").exists() and json.loads((path / "done").read_text()) == marker:
        return
    cfg = fault_config(args)
    cfg.seed = seed
    device = setup_runtime(cfg.system, seed)
    docs = documents(cfg)
    tok_path = RESULTS / f"tokenizer-{args.preset}.json"
    if not tok_path.exists():
        Tokenizer.train(docs, cfg.tokenizer.kind, cfg.tokenizer.vocab_size).save(tok_path)
    tok = Tokenizer.load(tok_path)
    cfg.model.vocab_size = tok.vocab_size
    splits = build_token_splits(docs, tok, RESULTS / ".cache", cfg.data.val_fraction, seed)
    model = GPT(cfg.model).to(device)
    lm = LanguageModeling(
        splits,
        tok,
        batch_size=cfg.train.batch_size,
        block_size=cfg.model.block_size,
        eval_batches_n=2,
        z_loss=0.0,
        seed=seed,
        device=device,
        sample_tokens=8,
    )
    objective = FaultyData(lm, kind, args.at if kind in ("repeat", "random") else [], seed)
    run = RunDir.create(path, overwrite=True)
    hooks = [Fault(kind, args.at, fault_blocks(seed, len(args.at), cfg.model.n_layer)), SpikeProbe(probes, run, tok)]
    with MetricStore(run.metrics_db_path) as store:
        train(model, objective, cfg.train, run, store, arch={}, hooks=hooks)
    (path / "done").write_text(json.dumps(marker))


def judge(kind: str, seed: int, at: int, block: int, events: list[dict], run: Path | None) -> dict[str, Any]:
    """Caught (an event 0-WITHIN steps after `at`), its delay, and whether its dossier points at the fault."""
    hit = next((e for e in events if at <= e["step"] <= at + WITHIN), None)
    out = {"kind": kind, "seed": seed, "at": at, "caught": hit is not None, "delay": None, "attributed": None}
    if hit is None:
        return out | {"attributed": False, "event_step": None, "named": None}
    out |= {"delay": hit["step"] - at, "event_step": hit["step"], "named": None}
    if run is None:  # replayed: no dossier
        return out
    dossier = json.loads((run / "spikes" / f"step-{hit['step']:07d}.json").read_text())
    if kind == "grad":
        first = dossier.get("first_departure")
        out["named"] = first and first["block"]
        out["attributed"] = out["named"] == f"blocks.{block}"
    elif kind in ("repeat", "random"):
        top = [r["row"] for r in dossier.get("top_rows", [])[: len(BAD_ROWS)]]
        out["named"] = top
        out["attributed"] = hit["step"] == at and set(top) == set(BAD_ROWS)
    else:
        out["attributed"] = True
    return out


def faults(args: argparse.Namespace) -> dict[str, Any]:
    probes = probes_config(args.set)
    RESULTS.mkdir(parents=True, exist_ok=True)
    results, false_alarms = [], 0
    for seed in args.seeds:
        for kind in args.kinds:
            path = RESULTS / f"{args.preset}-{kind}-s{seed}"
            if not args.replay:
                fault_run(path, kind, seed, args, probes)
            if args.replay:
                _, loss, grad = stage_series(path, "pretrain")
                events = [{"step": s} for s in replay(probes, loss, grad, [""] * len(loss), args.warmup)]
            else:
                events = [e for e in RunDir.open(path).events() if e["kind"] == "spike"]
            blocks = fault_blocks(seed, len(args.at), fault_config(args).model.n_layer)
            for at, block in zip(args.at, blocks):
                results.append(judge(kind, seed, at, block, events, None if args.replay else path))
            false_alarms += sum(not any(a <= e["step"] <= a + WITHIN for a in args.at) for e in events)
    by_kind = {
        kind: {
            "n": sum(r["kind"] == kind for r in results),
            "caught": sum(r["kind"] == kind and r["caught"] for r in results),
            "attributed": None if args.replay else sum(r["kind"] == kind and bool(r["attributed"]) for r in results),
        }
        for kind in args.kinds
    }
    return {
        "rule": probes.model_dump(),
        "faults": results,
        "by_kind": by_kind,
        "n": len(results),
        "caught_within_5": sum(r["caught"] for r in results),
        "caught_and_attributed": None if args.replay else sum(bool(r["attributed"]) for r in results),
        "false_alarms": false_alarms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    h = sub.add_parser("healthy", help="replay the detector over finished runs")
    h.add_argument("runs", nargs="+", help="run directories")
    f = sub.add_parser("faults", help="train pretraining runs with injected faults and score the detector")
    f.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    f.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    f.add_argument("--preset", default="smoke", help="the model, data and batch of the fault runs")
    f.add_argument("--steps", type=int, default=200, help="pretraining steps per run")
    f.add_argument("--warmup", type=int, default=20, help="learning-rate warm-up steps")
    f.add_argument("--at", type=int, nargs="+", default=[80, 130, 180], help="the steps the faults start at")
    f.add_argument("--replay", action="store_true", help="score the logged series of existing runs instead")
    for p in (h, f):
        p.add_argument("--set", action="append", default=[], help="probes.KEY=VALUE: the rule to measure")
    args = ap.parse_args()
    print(json.dumps(healthy(args) if args.mode == "healthy" else faults(args), indent=1))


if __name__ == "__main__":
    main()
