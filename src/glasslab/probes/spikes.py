"""Loss and gradient-norm spikes, and divergence: detect them, and write down what the run looked like.

Every step costs one fused norm over the gradients, one copy of the weights and one fused difference (the
measured update), all cheap next to a training step (bench/probe_overhead.py). A spike is a robust z-score
above the threshold against the rolling median/MAD of the previous `spike_window` steps. At its onset a
*dossier* goes to runs/<name>/spikes/step-NNNNNNN.json: the per-block gradient and update norms of that step
and the preceding ones, which block left its own band first, and the batch rows and tokens with the highest
loss. On NaN/inf, the batch is re-run with a hook on every module to name the first non-finite output.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from glasslab.config import ProbesConfig
from glasslab.data.tokenizer import Tokenizer
from glasslab.probes.forward import eval_mode, forward_hooks
from glasslab.probes.grads import Aggregator, tensor_norms, trained_parameters
from glasslab.probes.names import unit_of
from glasslab.track.atomic import write_json_atomic
from glasslab.track.layout import SPIKE_FAMILY, metric
from glasslab.track.rundir import RunDir
from glasslab.train.loop import Hook, StepContext
from glasslab.train.protocols import BatchIds, KindedBatches, TokenLosses

MAD_TO_SIGMA = 1.4826  # σ of a Gaussian = 1.4826 × its median absolute deviation
CONTEXT_TOKENS = 16  # tokens of context decoded before a high-loss target


def robust_band(values: Sequence[float], floor: float = 1e-12) -> tuple[float, float]:
    """(median, scale) of a series: scale is the MAD as a σ, floored at 1% of |median| so that a nearly
    constant series does not turn rounding noise into spikes, and at `floor`."""
    v = np.asarray(values, dtype=np.float64)
    median = float(np.median(v))
    mad = float(np.median(np.abs(v - median)))
    return median, max(MAD_TO_SIGMA * mad, 0.01 * abs(median), floor)


def departures(records: list[dict], history: int, threshold: float) -> list[dict]:
    """For each block and norm kind, the first of the last `history + 1` steps whose norm left the block's own
    robust band (computed on the steps before them), earliest first. The first entry is the block that moved first."""
    recent, reference = records[-(history + 1) :], records[: -(history + 1)]
    out = []
    for kind in ("grad_norm", "update_norm"):
        ref = [r[kind] for r in reference if r[kind] is not None]
        if len(ref) < 8:
            continue
        for block in ref[0]:
            median, scale = robust_band([x[block] for x in ref])
            for r in recent:
                score = (r[kind][block] - median) / scale if r[kind] is not None else -math.inf
                if score > threshold:
                    out.append({"block": block, "norm": kind, "step": r["step"], "score": score})
                    break
    return sorted(out, key=lambda d: (d["step"], -d["score"]))


def first_nonfinite_module(model: nn.Module, run_forward: Callable[[], Any]) -> str | None:
    """The name of the first module, in execution order, whose output has a NaN/inf (None if all are finite).
    Forward hooks fire when a module finishes, so the innermost module that produced it is named."""
    found: list[str] = []

    def check(name: str, module: nn.Module, args: tuple, output: Any) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        if not found and any(
            isinstance(t, Tensor) and t.is_floating_point() and not t.isfinite().all() for t in outputs
        ):
            found.append(name)

    with torch.no_grad(), forward_hooks((m, partial(check, name or "model")) for name, m in model.named_modules()):
        run_forward()
    return found[0] if found else None


class SpikeProbe(Hook):
    """Spike detector, spike dossiers and the non-finite diagnosis. Logs `spike/loss_score` and
    `spike/grad_norm_score` (robust z-scores) every step once the window holds half its steps.

    When the objective sorts its batches into kinds (`batch_kind`, e.g. SFT's length buckets), each kind has its
    own window: a batch is compared with recent batches of its kind, so a harder kind of batch is not a spike.

    Its windows, step records and whether a spike is under way are saved with every checkpoint, so a resumed run
    scores and reports spikes exactly as the uninterrupted one. It reads raw gradients, so it runs early (`order`)."""

    order = -10

    def __init__(self, cfg: ProbesConfig, run: RunDir, tokenizer: Tokenizer | None) -> None:
        self.window, self.threshold = cfg.spike_window, cfg.spike_threshold
        self.floors = {"loss": cfg.spike_loss_floor, "grad_norm": 1e-12}
        self.history, self.topk = cfg.spike_history, cfg.spike_topk
        self.run, self.tokenizer = run, tokenizer

    def on_train_start(self, ctx: StepContext) -> None:
        self.keys, self.params = trained_parameters(ctx.model)
        self.blocks = Aggregator(self.keys, lambda k: [unit_of(k)])
        self.before = [p.detach().clone() for p in self.params]  # reused every step for the update
        self.signals: dict[tuple[str, str], deque[float]] = defaultdict(lambda: deque(maxlen=self.window))
        self.records: deque[dict] = deque(maxlen=self.window + self.history + 1)
        self.in_spike, self.pending, self.nonfinite_grads = False, None, []
        self.record: dict = {"step": None}

    def state_dict(self) -> dict:
        """What carries over from step to step (`pending` and `record` live within one step)."""
        return {
            "signals": [[kind, name, list(values)] for (kind, name), values in self.signals.items()],
            "records": list(self.records),
            "in_spike": self.in_spike,
        }

    def load_state_dict(self, state: dict) -> None:
        for kind, name, values in state["signals"]:
            self.signals[kind, name].extend(values)
        self.records.extend(state["records"])
        self.in_spike = state["in_spike"]

    @torch.no_grad()
    def on_backward(self, ctx: StepContext) -> None:
        norms, present = tensor_norms([p.grad for p in self.params])
        by_block = self.blocks(norms, present)[0]
        values = torch.cat([by_block, norms.square().sum().sqrt()[None]]).tolist()
        total = values[-1]
        torch._foreach_copy_(self.before, [p.detach() for p in self.params])
        self.record = {
            "step": ctx.step + 1,
            "loss": ctx.loss,
            "total_grad_norm": total,
            "grad_norm": dict(zip(self.blocks.names, values[:-1])),
            "update_norm": None,
        }
        self.nonfinite_grads = [k for k, v in zip(self.keys, norms.tolist()) if not math.isfinite(v)]
        if self.nonfinite_grads:
            return
        fired = {}
        kind = ctx.objective.batch_kind(ctx.batch) if isinstance(ctx.objective, KindedBatches) else ""
        for name, value in (("loss", ctx.loss), ("grad_norm", total)):
            past = self.signals[kind, name]
            if len(past) >= self.window // 2:
                median, scale = robust_band(past, self.floors[name])
                score = (value - median) / scale
                ctx.metrics[metric(SPIKE_FAMILY, f"{name}_score")] = score
                if score > self.threshold:
                    fired[name] = {"value": value, "score": score, "median": median, "scale": scale} | (
                        {"batch_kind": kind} if kind else {}
                    )
            past.append(value)
        if fired and not self.in_spike:  # one dossier per spike, at its onset
            self.pending = {"signals": fired, **self.worst_tokens(ctx)}
        self.in_spike = bool(fired)

    @torch.no_grad()
    def on_optimizer_step(self, ctx: StepContext) -> None:
        torch._foreach_sub_(self.before, [p.detach() for p in self.params])  # before - after: the update, negated
        self.record["update_norm"] = dict(zip(self.blocks.names, self.blocks(*tensor_norms(self.before))[0].tolist()))
        self.records.append(self.record)
        if self.pending is not None:
            self.write_spike(ctx, self.pending)
            self.pending = None

    def on_nonfinite(self, ctx: StepContext) -> None:
        step = ctx.step + 1
        module = first_nonfinite_module(ctx.model, lambda: ctx.objective.loss(ctx.model, ctx.batch))
        grads = self.nonfinite_grads if math.isfinite(ctx.loss) else []
        what = "loss" if not math.isfinite(ctx.loss) else "gradient norm"
        if module:
            cause = f"first non-finite module output: {module}"
        elif grads:
            cause = (
                f"forward is finite; non-finite gradients in {', '.join(grads[:5])}{' ...' if len(grads) > 5 else ''}"
            )
        else:
            cause = "no module output is non-finite when the batch is re-run"
        info = {"what": what, "loss": ctx.loss, "first_nonfinite_module": module, "nonfinite_grads": grads}
        path = self.write_dossier(ctx, step, "nonfinite", {"nonfinite": info})
        self.run.log_event(
            "nonfinite",
            f"{what} became non-finite at step {step}: {cause}",
            step=step,
            stage=ctx.stage,
            module=module,
            nonfinite_grads=grads,
            dossier=str(path),
        )

    def worst_tokens(self, ctx: StepContext) -> dict:
        """The batch rows and (row, position) targets with the highest loss, recomputed with the weights that
        produced the spike. Uses the step's last micro-batch when gradients are accumulated."""
        objective = ctx.objective
        if not isinstance(objective, TokenLosses):
            return {}
        with eval_mode(ctx.model):
            losses = objective.token_losses(ctx.model, ctx.batch).float().cpu()
        decode = self.tokenizer.decode if self.tokenizer and isinstance(objective, BatchIds) else None
        inputs, targets = (t.cpu() for t in objective.batch_ids(ctx.batch)) if decode else (None, None)
        row_loss = losses.nanmean(1)
        rows = []
        for r in torch.topk(row_loss.nan_to_num(-math.inf), min(self.topk, len(row_loss))).indices.tolist():
            rows.append({"row": r, "mean_loss": row_loss[r].item()} | ({"text": decode(inputs[r])} if decode else {}))
        tokens = []
        flat = losses.flatten().nan_to_num(-math.inf)
        for i in torch.topk(flat, min(self.topk, flat.numel())).indices.tolist():
            r, t = divmod(i, losses.size(1))
            entry = {"row": r, "pos": t, "loss": losses[r, t].item()}
            if decode:
                context = inputs[r, max(0, t + 1 - CONTEXT_TOKENS) : t + 1]
                entry |= {"context": decode(context), "target": decode(targets[r, t : t + 1])}
            tokens.append(entry)
        return {"batch_mean_loss": losses.nanmean().item(), "top_rows": rows, "top_tokens": tokens}

    def write_spike(self, ctx: StepContext, found: dict) -> None:
        moved = departures(list(self.records), self.history, self.threshold)
        path = self.write_dossier(
            ctx, ctx.step, "spike", {**found, "first_departure": moved[0] if moved else None, "departures": moved}
        )
        signal, info = max(found["signals"].items(), key=lambda kv: kv[1]["score"])
        of = f" of {info['batch_kind']} batches" if "batch_kind" in info else ""
        message = f"{signal} spike at step {ctx.step}: {info['value']:.4g} vs median {info['median']:.4g}{of} (score {info['score']:.1f})"
        if found.get("top_rows"):
            message += f"; worst rows {', '.join(str(r['row']) for r in found['top_rows'][:3])}"
        if moved:
            message += f"; first to move: {moved[0]['block']} {moved[0]['norm']} at step {moved[0]['step']}"
        self.run.log_event(
            "spike", message, step=ctx.step, stage=ctx.stage, signals=found["signals"], dossier=str(path)
        )

    def write_dossier(self, ctx: StepContext, step: int, kind: str, body: dict) -> Path:
        """Atomically write spikes/step-NNNNNNN.json with the last `spike_history + 1` step records."""
        self.run.spikes_dir.mkdir(parents=True, exist_ok=True)
        path = self.run.spike_path(step)
        records = [*self.records, self.record] if kind == "nonfinite" and self.record["step"] == step else self.records
        history = list(records)[-(self.history + 1) :]
        write_json_atomic(
            path,
            {"kind": kind, "stage": ctx.stage, "step": step, "threshold": self.threshold, **body, "history": history},
        )
        return path
