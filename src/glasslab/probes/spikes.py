"""Loss and gradient-norm spikes, and divergence: detect them, and write down what the run looked like.

Every step costs one fused norm over the gradients, one copy of the weights and one fused difference (the
measured update), all cheap next to a training step (bench/probe_overhead.py). A spike is a robust z-score
above threshold against the band of the previous `spike_window` steps (`SpikeRule`); consecutive spike steps
are one episode. At an episode's onset a *dossier* goes to runs/<name>/spikes/step-NNNNNNN.json: the per-block
gradient and update norms of that step and the preceding ones, which block left its own band first, and the
batch rows and tokens with the highest loss. On NaN/inf, the batch is re-run with a hook on every module to
name the first non-finite output. How the rule was chosen, by false alarms and injected faults:
bench/spike_detection.py.
"""

from __future__ import annotations

import math
from collections import deque
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


def robust_band(values: Sequence[float], floor: float = 1e-12, relative: float = 0.01) -> tuple[float, float]:
    """(median, scale) of a series: scale is the MAD as a σ, floored at `relative` × |median| so that a nearly
    constant series does not turn rounding noise into spikes, and at `floor`."""
    v = np.asarray(values, dtype=np.float64)
    median = float(np.median(v))
    mad = float(np.median(np.abs(v - median)))
    return median, max(MAD_TO_SIGMA * mad, relative * abs(median), floor)


def trend_band(values: Sequence[float], floor: float = 1e-12, relative: float = 0.01) -> tuple[float, float]:
    """(expected next value, scale) of a series that may be trending: the line through the medians of its two
    halves (robust to outliers, as the median is), extrapolated one step past the end; the scale is the MAD of
    the residuals from that line as a σ, floored as in `robust_band`. A plain median lags a falling loss, and
    the spread the trend adds to the MAD hides a real jump."""
    v = np.asarray(values, dtype=np.float64)
    n, half = len(v), len(v) // 2
    t = np.arange(n, dtype=np.float64)
    c1, c2 = (half - 1) / 2, half + (n - half - 1) / 2
    m1, m2 = float(np.median(v[:half])), float(np.median(v[half:]))
    slope = (m2 - m1) / (c2 - c1)
    residuals = v - (m2 + slope * (t - c2))
    centre = float(np.median(residuals))
    expected = m2 + slope * (n - c2) + centre
    mad = float(np.median(np.abs(residuals - centre)))
    return expected, max(MAD_TO_SIGMA * mad, relative * abs(expected), floor)


def departures(records: list[dict], history: int, threshold: float) -> list[dict]:
    """The blocks and norm kinds that are out of their own robust band (computed on the steps before the last
    `history + 1`) at the last step, each with the step its excursion began: the earliest of the last
    `history + 1` steps from which it stayed out through the last one. Earliest first, then highest score; the
    first entry is the block that moved first. A block that left its band and came back before the spike is
    noise, not a precursor, and is not listed."""
    recent, reference = records[-(history + 1) :], records[: -(history + 1)]
    out = []
    for kind in ("grad_norm", "update_norm"):
        ref = [r[kind] for r in reference if r[kind] is not None]
        if len(ref) < 8:
            continue
        for block in ref[0]:
            median, scale = robust_band([x[block] for x in ref])
            scores = [(r[kind][block] - median) / scale if r[kind] is not None else -math.inf for r in recent]
            if not scores or scores[-1] <= threshold:
                continue
            start = len(scores) - 1
            while start > 0 and scores[start - 1] > threshold:
                start -= 1
            out.append({"block": block, "norm": kind, "step": recent[start]["step"], "score": scores[-1]})
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


class SpikeRule:
    """The detector's decision, apart from the training loop: fed each step's loss and gradient norm, it returns
    their scores and the signals above threshold, and says when a spike *episode* starts. Its state is plain
    numbers, so the same rule replays over logged series (bench/spike_detection.py) and goes into checkpoints.

    A step is scored against the steps before it of the same batch kind, once `window // 2` of them are kept.
    Signals listed in `log_signals` are scored on their logarithm: a gradient norm varies by factors, and a band
    of logs does not let the upper tail of a skewed series look like a departure. Steps up to `warmup` are
    neither scored nor kept: during learning-rate warm-up the norm moves for a known reason. With `detrend` the
    band is centred on the window's trend line (`trend_band`), not its median. An episode starts with a step
    above threshold and ends after `quiet` steps in a row below it; only its onset is an event."""

    def __init__(
        self,
        window: int,
        thresholds: dict[str, float],
        floors: dict[str, float],
        log_signals: frozenset[str] = frozenset(),
        warmup: int = 0,
        quiet: int = 1,
        detrend: bool = False,
    ) -> None:
        self.window, self.thresholds, self.floors, self.detrend = window, thresholds, floors, detrend
        self.log_signals, self.warmup, self.quiet = log_signals, warmup, quiet
        self.past: dict[tuple[str, str], deque[float]] = {}
        self.in_episode, self.quiet_steps = False, 0

    def observe(self, step: int, kind: str, values: dict[str, float]) -> tuple[dict[str, dict], bool]:
        """Score one step's signals: ({signal: {value, score, expected, scale}} for every scored signal, is this
        step the onset of an episode). `expected` is the band's centre (its median, or its trend line's value at
        this step), in the signal's own units like `scale` (a log signal's are exp'd back, the scale as a factor)."""
        scored = {}
        if step > self.warmup:
            for name, value in values.items():
                if name in self.log_signals and not value > 0:
                    continue  # nothing was trained (e.g. GRPO with no group left): no norm to compare
                x = math.log(value) if name in self.log_signals else value
                past = self.past.setdefault((kind, name), deque(maxlen=self.window))
                if len(past) >= self.window // 2:
                    band_of = trend_band if self.detrend else robust_band
                    if name in self.log_signals:
                        centre, scale = band_of(past, self.floors.get(name, 1e-12), relative=0.0)
                        band = {"expected": math.exp(centre), "scale": math.exp(scale)}
                    else:
                        centre, scale = band_of(past, self.floors.get(name, 1e-12))
                        band = {"expected": centre, "scale": scale}
                    scored[name] = {"value": value, "score": (x - centre) / scale, **band}
                past.append(x)
        fired = any(v["score"] > self.thresholds[k] for k, v in scored.items())
        onset = fired and not self.in_episode
        if fired:
            self.in_episode, self.quiet_steps = True, 0
        elif self.in_episode:
            self.quiet_steps += 1
            self.in_episode = self.quiet_steps < self.quiet
        return scored, onset

    def fired(self, scored: dict[str, dict]) -> dict[str, dict]:
        """The signals of `observe`'s scores that are above their threshold."""
        return {k: v for k, v in scored.items() if v["score"] > self.thresholds[k]}

    def state_dict(self) -> dict:
        """JSON-able: the windows as [kind, signal, values] triples, and the episode state."""
        return {
            "past": [[kind, name, list(values)] for (kind, name), values in self.past.items()],
            "in_episode": self.in_episode,
            "quiet_steps": self.quiet_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.past = {(kind, name): deque(values, maxlen=self.window) for kind, name, values in state["past"]}
        self.in_episode, self.quiet_steps = bool(state["in_episode"]), int(state["quiet_steps"])


def rule_of(cfg: ProbesConfig) -> SpikeRule:
    """The rule the `probes` config describes (its warm-up is set per stage, by the probe)."""
    return SpikeRule(
        cfg.spike_window,
        {"loss": cfg.spike_threshold, "grad_norm": cfg.spike_grad_threshold},
        {"loss": cfg.spike_loss_floor, "grad_norm": cfg.spike_grad_floor if cfg.spike_log_grad else 1e-12},
        frozenset({"grad_norm"}) if cfg.spike_log_grad else frozenset(),
        quiet=cfg.spike_quiet,
        detrend=cfg.spike_detrend,
    )


class SpikeProbe(Hook):
    """Spike detector (`SpikeRule`), spike dossiers and the non-finite diagnosis. Logs `spike/loss_score` and
    `spike/grad_norm_score` every step after the stage's warm-up once the window holds half its steps. One probe
    serves one stage (build_probes makes one per stage).

    When the objective sorts its batches into kinds (`batch_kind`, e.g. SFT's length buckets), each kind has its
    own window: a batch is compared with recent batches of its kind, so a harder kind of batch is not a spike.

    Its rule's windows and episode and the step records are saved with every checkpoint, so a resumed run scores
    and reports spikes exactly as the uninterrupted one. It reads raw gradients, so it runs early (`order`)."""

    order = -10

    def __init__(self, cfg: ProbesConfig, run: RunDir, tokenizer: Tokenizer | None) -> None:
        self.cfg, self.threshold = cfg, cfg.spike_threshold
        self.history, self.topk = cfg.spike_history, cfg.spike_topk
        self.run, self.tokenizer = run, tokenizer
        self.rule = rule_of(cfg)
        self.records: deque[dict] = deque(maxlen=cfg.spike_window + self.history + 1)

    def on_train_start(self, ctx: StepContext) -> None:
        self.keys, self.params = trained_parameters(ctx.model)
        self.blocks = Aggregator(self.keys, lambda k: [unit_of(k)])
        self.before = [p.detach().clone() for p in self.params]  # reused every step for the update
        self.rule.warmup = ctx.cfg.warmup_steps if self.cfg.spike_skip_warmup else 0
        self.pending, self.nonfinite_grads = None, []
        self.record: dict = {"step": None}

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
        kind = ctx.objective.batch_kind(ctx.batch) if isinstance(ctx.objective, KindedBatches) else ""
        scored, onset = self.rule.observe(ctx.step + 1, kind, {"loss": ctx.loss, "grad_norm": total})
        for name, info in scored.items():
            ctx.metrics[metric(SPIKE_FAMILY, f"{name}_score")] = info["score"]
        if onset:  # one dossier per episode, at its onset
            fired = {k: v | ({"batch_kind": kind} if kind else {}) for k, v in self.rule.fired(scored).items()}
            self.pending = {"signals": fired, **self.worst_tokens(ctx)}

    def state_dict(self) -> dict:
        """What a resumed stage needs to score and write dossiers exactly as the uninterrupted one: the rule's
        windows and episode, and the per-step records the next dossier's history and departures are made of."""
        return {"rule": self.rule.state_dict(), "records": list(self.records)}

    def load_state_dict(self, state: dict) -> None:
        self.rule.load_state_dict(state["rule"])
        self.records = deque(state["records"], maxlen=self.records.maxlen)

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
        message = f"{signal} spike at step {ctx.step}: {info['value']:.4g} vs expected {info['expected']:.4g}{of} (score {info['score']:.1f})"
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
