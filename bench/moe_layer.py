"""The MoE layer's forward + backward, side by side with minimind's MoE feed-forward at the same shape and routing.

Usage:
    python bench/moe_layer.py --minimind PATH/model/model_minimind.py [--rounds 7] [--reps 20] [--out FILE]
    python bench/moe_layer.py                     # no minimind file: a stand-in baseline (see below)

With `--minimind`, the file of a jingyaogong/minimind checkout is imported (it needs `transformers`, which it
imports) and its `MOEFeedForward` is built with `MiniMindConfig`; nothing of it is copied here. Its weights are
copied into glasslab's layer (router = its gate; each expert's up = [up_proj; gate_proj], down = down_proj), and
before any timing the two outputs are checked to be equal, so both compute the same function with the same routing
(softmax scores, top-k, gates not renormalised, SwiGLU experts). Both run in train mode with their auxiliary
loss on and added to the loss, as in training.

Without the file, the baseline is a STAND-IN written for this script: the standard loop over experts (for each
expert, the tokens that chose it found with a mask and `nonzero`, gathered, run through the expert's three
Linear layers, weighted and scattered back with `index_add_`), which is the pattern minimind's file documents.
Figures from the stand-in are not minimind's: the real comparison needs their file.

Variants are timed in interleaved rounds (the order rotates each round), so a change in machine load hits both
alike; reported are the median over rounds of each round's median call time, and the range over rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from glasslab.config import ModelConfig, MoEConfig  # noqa: E402
from glasslab.model.gpt import feed_forward  # noqa: E402
from glasslab.model.moe import MoE, add_router_losses  # noqa: E402

NAMES = ("up_proj", "gate_proj", "down_proj")  # the baseline's Linear layers of one expert, in copy order
AUX = 5e-4  # minimind's default router_aux_loss_coef; glasslab's aux_loss set to the same


class StandInExpertLoop(nn.Module):
    """STAND-IN baseline (not minimind's code): softmax router, top-k, a Python loop over experts that gathers each
    expert's tokens by mask + nonzero, runs its gate/up/down Linear layers and index_adds the weighted result."""

    def __init__(self, n_embd: int, hidden: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(n_embd, n_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.ModuleDict(
                {
                    "gate_proj": nn.Linear(n_embd, hidden, bias=False),
                    "up_proj": nn.Linear(n_embd, hidden, bias=False),
                    "down_proj": nn.Linear(hidden, n_embd, bias=False),
                }
            )
            for _ in range(n_experts)
        )
        self.aux_loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.size(-1))
        scores = self.gate(flat).softmax(-1)
        weights, chosen = scores.topk(self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            hit = chosen == e
            rows = hit.any(-1).nonzero().flatten()
            if rows.numel():
                part = flat[rows]
                h = F.silu(expert["gate_proj"](part)) * expert["up_proj"](part)
                out.index_add_(0, rows, expert["down_proj"](h) * weights[hit].unsqueeze(1))
        share = F.one_hot(chosen, len(self.experts)).float().mean(0)
        self.aux_loss = (share * scores.mean(0)).sum() * len(self.experts) * AUX
        return out.view_as(x)


def minimind_layer(path: Path, n_embd: int, hidden: int, n_experts: int, top_k: int) -> nn.Module:
    spec = importlib.util.spec_from_file_location("model_minimind", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.MiniMindConfig(
        hidden_size=n_embd,
        use_moe=True,
        num_experts=n_experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=hidden,
        norm_topk_prob=False,
        router_aux_loss_coef=AUX,
        hidden_act="silu",
    )
    return module.MOEFeedForward(cfg)


def glasslab_layer(n_embd: int, hidden: int, n_experts: int, top_k: int) -> MoE:
    moe = MoEConfig(n_experts=n_experts, top_k=top_k, hidden=hidden, renormalize=False, aux_loss=AUX)
    return feed_forward(ModelConfig(n_embd=n_embd, n_head=4, mlp="swiglu", moe=moe), 0)


@torch.no_grad()
def copy_weights(src: nn.Module, dst: MoE) -> None:
    """The baseline's weights into glasslab's layout: up = [up_proj | gate_proj] (SwiGLU's value half first)."""
    dst.router.weight.copy_(src.gate.weight)
    for e, expert in enumerate(src.experts):
        up, gate, down = (expert[n] if isinstance(expert, nn.ModuleDict) else getattr(expert, n) for n in NAMES)
        dst.experts.up[e].copy_(torch.cat([up.weight, gate.weight]).T)
        dst.experts.down[e].copy_(down.weight.T)


def step_of(layer: nn.Module, x: Tensor, ours: bool) -> Callable[[], None]:
    """One training forward + backward, the auxiliary loss included."""

    def step() -> None:
        y = layer(x)
        loss = y.square().mean()
        loss = add_router_losses(layer, loss, {})[0] if ours else loss + layer.aux_loss
        loss.backward()
        layer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minimind", type=Path, default=None, help="path to minimind's model/model_minimind.py")
    ap.add_argument("--tokens", type=int, default=16 * 128, help="tokens per call (tiny: batch 16 x context 128)")
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512, help="each expert's hidden width")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20, help="timed calls per variant per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.n_embd, args.hidden, args.experts, args.top_k)
    baseline_name = "minimind MOEFeedForward" if args.minimind else "stand-in expert loop (NOT minimind's file)"
    baseline = minimind_layer(args.minimind, *shape) if args.minimind else StandInExpertLoop(*shape)
    ours = glasslab_layer(*shape)
    copy_weights(baseline, ours)
    baseline.train()
    ours.train()
    x = torch.randn(args.tokens // 128, 128, args.n_embd)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), baseline(x), rtol=1e-4, atol=1e-5)  # same function, same routing
    variants = {"glasslab": step_of(ours, x, True), "baseline": step_of(baseline, x, False)}
    for fn in variants.values():  # warm-up
        for _ in range(3):
            fn()
    per_round: dict[str, list[float]] = {name: [] for name in variants}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        names = list(variants)[r % 2 :] + list(variants)[: r % 2]
        for name in names:
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                variants[name]()
                times.append(time.perf_counter() - t0)
            per_round[name].append(statistics.median(times))
    summary = {
        name: {"median_ms": 1e3 * statistics.median(v), "min_ms": 1e3 * min(v), "max_ms": 1e3 * max(v)}
        for name, v in per_round.items()
    }
    speedups = [b / g for b, g in zip(per_round["baseline"], per_round["glasslab"])]
    report = {
        "baseline": baseline_name,
        "shape": vars(args) | {"minimind": str(args.minimind) if args.minimind else None, "out": None},
        "torch": torch.__version__,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "results": summary,
        "speedup_median": statistics.median(speedups),
        "speedup_range": [min(speedups), max(speedups)],
    }
    for name, s in summary.items():
        print(
            f"{name:>9}: median {s['median_ms']:.2f} ms per forward+backward (rounds {s['min_ms']:.2f}-{s['max_ms']:.2f})"
        )
    print(
        f"baseline = {baseline_name}; glasslab {report['speedup_median']:.2f}x faster "
        f"(per round {min(speedups):.2f}-{max(speedups):.2f}); load {load_before} -> {os.getloadavg()}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
