"""The router made visible: per MoE layer, how the training batches' tokens spread over the experts, how sure the
router is, how fast its choices churn, and the balancing biases.

A forward hook on each `blocks.i.mlp.router` receives the `Routing` the layer used, for the step's training
forwards (train mode, gradients on) on probe steps, and for the probe's own no-grad forwards: the fixed probe rows
(churn) and the fixed validation batches at each evaluation (MaxVio over a set that does not change). The model's
forward knows nothing of it.

Metrics, all under PREFIX, per layer `blocks.i` (and model-wide without the layer):
  load/blocks.i.eK   share of the step's token-to-expert assignments that went to expert K (before capacity drops)
  maxvio             max load / mean load - 1 (0 = perfectly balanced; E - 1 = everything on one expert)
  cv                 coefficient of variation of the per-expert assignment counts (population std / mean)
  dropped            share of assignments dropped by a capacity limit (0 when dropless)
  entropy            mean over tokens of the entropy (nats) of the token's routing distribution
  entropy_mean       entropy of the mean routing distribution over the step's tokens
  diversity          exp(entropy of the load shares) / E: 1 = all experts used equally, 1/E = one expert
  top1_gate          mean gate of each token's first choice
  bias/blocks.i.eK   the auxiliary-loss-free selection bias of expert K, after the step's update
  dead               experts that received no assignment over the last `dead_window` probed steps
  churn              share of the probe rows' tokens whose first-choice expert changed since the last churn probe
  eval_maxvio        maxvio of the assignments over all the fixed validation batches, at each evaluation
  domain_load/D/blocks.i.eK  with a data mixture: the load share of expert K over domain D's validation batches
The Switch auxiliary loss and router z-loss themselves are logged by the loop as train/moe_aux_loss, train/moe_z_loss.
"""

from __future__ import annotations

from collections import deque
from functools import partial

import torch
from torch import Tensor, nn

from glasslab.model.moe import Router, Routing
from glasslab.probes.forward import eval_mode, modules_of
from glasslab.track.layout import MOE_FAMILY, metric
from glasslab.train.loop import Hook, StepContext

PREFIX = metric(MOE_FAMILY, "")  # "moe/"


def routing_sums(r: Routing) -> Tensor:
    """The additive summary of one routing decision over E experts, (2E + 5,) float64: assignment counts per
    expert (E), routing probabilities summed over tokens (E), dropped assignments, assignments, tokens, the sum of
    the tokens' routing entropies, the sum of first-choice gates. Sums of several forwards are their union's."""
    n_experts = r.scores.size(-1)
    probs = (r.scores / r.scores.sum(-1, keepdim=True)).double()
    counts = torch.bincount(r.experts.flatten(), minlength=n_experts).double()
    dropped = (~r.kept).sum().double() if r.kept is not None else probs.new_zeros(())
    rest = torch.stack(
        [
            dropped,
            probs.new_tensor(float(r.experts.numel())),
            probs.new_tensor(float(r.experts.size(0))),
            torch.special.entr(probs).sum(),
            r.gates[:, 0].double().sum(),
        ]
    )
    return torch.cat([counts, probs.sum(0), rest])


def routing_metrics(sums: Tensor, n_experts: int) -> dict[str, Tensor | list]:
    """The per-layer metrics of `routing_sums` (see the module docstring), as 0-d tensors and a load list."""
    counts, prob_sum = sums[:n_experts], sums[n_experts : 2 * n_experts]
    dropped, assignments, tokens, entropy_sum, top1_sum = sums[2 * n_experts :]
    load = counts / counts.sum().clamp_min(1)
    mean_probs = prob_sum / tokens.clamp_min(1)
    return {
        "load": load,
        "maxvio": counts.max() / counts.mean().clamp_min(1e-12) - 1,
        "cv": counts.std(unbiased=False) / counts.mean().clamp_min(1e-12),
        "dropped": dropped / assignments.clamp_min(1),
        "entropy": entropy_sum / tokens.clamp_min(1),
        "entropy_mean": torch.special.entr(mean_probs).sum(),
        "diversity": torch.special.entr(load).sum().exp() / n_experts,
        "top1_gate": top1_sum / tokens.clamp_min(1),
    }


def maxvio(counts: Tensor) -> float:
    """max load / mean load - 1 of per-expert assignment counts."""
    counts = counts.double()
    return float(counts.max() / counts.mean().clamp_min(1e-12) - 1)


class RouterProbe(Hook):
    """Router metrics every `every` steps from the training forwards, churn every `churn_every` steps on the
    objective's probe rows, MaxVio over the validation batches at every evaluation. Skips itself on a dense model."""

    def __init__(self, every: int, churn_every: int, dead_window: int) -> None:
        self.every, self.churn_every, self.dead_window = every, churn_every, dead_window
        self.window: dict[str, deque[list[float]]] = {}
        self.last_top1: dict[str, list[int]] = {}
        self._mode: str | None = None  # "train": count training forwards; "probe": count every forward
        self._sums: dict[str, Tensor] = {}
        self._top1: dict[str, Tensor] = {}
        self._handles: list = []

    # ---- capture ---------------------------------------------------------------------------------

    def on_train_start(self, ctx: StepContext) -> None:
        model = getattr(ctx.model, "module", ctx.model)
        self.routers: dict[str, Router] = modules_of(model, Router, ".mlp.router")
        self._handles = [r.register_forward_hook(partial(self._capture, name)) for name, r in self.routers.items()]
        self.n_experts = {name: r.bias.numel() for name, r in self.routers.items()}

    def _capture(self, layer: str, module: nn.Module, args: tuple, r: Routing) -> None:
        if self._mode is None or (self._mode == "train" and not (module.training and torch.is_grad_enabled())):
            return
        with torch.no_grad():
            sums = routing_sums(r)
            self._sums[layer] = self._sums[layer] + sums if layer in self._sums else sums
            if self._mode == "probe":
                first = r.experts[:, 0]
                self._top1[layer] = torch.cat([self._top1[layer], first]) if layer in self._top1 else first

    def on_train_end(self, ctx: StepContext) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- the training step -------------------------------------------------------------------------

    def on_step_start(self, ctx: StepContext) -> None:
        due = bool(self.routers) and bool(self.every) and (ctx.step + 1) % self.every == 0
        self._mode, self._sums = ("train" if due else None), {}

    def on_optimizer_step(self, ctx: StepContext) -> None:
        self._mode = None
        if self._sums:
            ctx.metrics.update(self._step_metrics())
        if self.routers and self.churn_every and ctx.step % self.churn_every == 0:
            ctx.metrics.update(self._churn(ctx))
        self._sums = {}

    def _step_metrics(self) -> dict[str, float]:
        names, values = [], []
        layers = sorted(self._sums)
        for layer in layers:
            e = self.n_experts[layer]
            metrics = routing_metrics(self._sums[layer], e)
            load = metrics.pop("load")
            names += [f"{PREFIX}load/{layer}.e{k}" for k in range(e)] + [f"{PREFIX}{m}/{layer}" for m in metrics]
            values += [load, torch.stack(list(metrics.values()))]
            names += [f"{PREFIX}bias/{layer}.e{k}" for k in range(e)]
            values.append(self.routers[layer].bias.double().cpu())
        out = dict(zip(names, torch.cat([v.flatten().cpu() for v in values]).tolist()))
        for kind in ("maxvio", "cv", "dropped", "entropy", "diversity", "top1_gate"):
            out[f"{PREFIX}{kind}"] = sum(out[f"{PREFIX}{kind}/{layer}"] for layer in layers) / len(layers)
        out.update(self._dead(layers))
        return out

    def _dead(self, layers: list[str]) -> dict[str, float]:
        """Experts with no assignment over the last dead_window probed steps; reported once the window is full."""
        out: dict[str, float] = {}
        for layer in layers:
            counts = self._sums[layer][: self.n_experts[layer]].tolist()
            window = self.window.setdefault(layer, deque(maxlen=self.dead_window))
            window.append(counts)
            if len(window) == self.dead_window:
                out[f"{PREFIX}dead/{layer}"] = float(sum(not any(c) for c in zip(*window)))
        if out:
            out[f"{PREFIX}dead"] = sum(out.values())
        return out

    # ---- fixed rows: churn and evaluation ------------------------------------------------------------

    def _probe_forwards(self, model: nn.Module, batches: list[Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Run the batches through the model (eval mode, no grad), capturing the routing of every forward."""
        self._mode, self._sums, self._top1 = "probe", {}, {}
        try:
            with torch.no_grad(), eval_mode(model):
                for x in batches:
                    model(x)
        finally:
            self._mode = None
        sums, top1 = self._sums, self._top1
        self._sums, self._top1 = {}, {}
        return sums, top1

    def _churn(self, ctx: StepContext) -> dict[str, float]:
        if not hasattr(ctx.objective, "probe_inputs"):
            return {}
        _, top1 = self._probe_forwards(ctx.model, [ctx.objective.probe_inputs()])
        out = {}
        for layer, first in top1.items():
            now = first.tolist()
            before = self.last_top1.get(layer)
            if before is not None and len(before) == len(now):
                out[f"{PREFIX}churn/{layer}"] = sum(a != b for a, b in zip(before, now)) / len(now)
            self.last_top1[layer] = now
        if out:
            out[f"{PREFIX}churn"] = sum(out.values()) / len(out)
        return out

    def on_eval(self, ctx: StepContext) -> None:
        objective = ctx.objective
        if not (self.routers and hasattr(objective, "val_batches") and hasattr(objective, "batch_ids")):
            return
        device = next(ctx.model.parameters()).device
        inputs = [objective.batch_ids(b)[0].to(device) for b in objective.val_batches()]
        domains = objective.val_domains() if hasattr(objective, "val_domains") else [None] * len(inputs)
        out: dict[str, float] = {}
        total: dict[str, Tensor] = {}
        for domain in dict.fromkeys(domains):
            sums, _ = self._probe_forwards(ctx.model, [x for x, d in zip(inputs, domains) if d == domain])
            for layer, s in sums.items():
                counts = s[: self.n_experts[layer]]
                total[layer] = total[layer] + counts if layer in total else counts
                if domain is not None:
                    shares = (counts / counts.sum().clamp_min(1)).tolist()
                    out.update({f"{PREFIX}domain_load/{domain}/{layer}.e{k}": v for k, v in enumerate(shares)})
        for layer, counts in total.items():
            out[f"{PREFIX}eval_maxvio/{layer}"] = maxvio(counts)
        if total:
            out[f"{PREFIX}eval_maxvio"] = sum(out[f"{PREFIX}eval_maxvio/{layer}"] for layer in total) / len(total)
        ctx.metrics.update(out)

    # ---- resume ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The dead-expert window and the last churn probe's choices, as plain lists."""
        return {
            "window": {layer: list(w) for layer, w in self.window.items()},
            "last_top1": dict(self.last_top1),
        }

    def load_state_dict(self, state: dict) -> None:
        self.window = {layer: deque(w, maxlen=self.dead_window) for layer, w in state["window"].items()}
        self.last_top1 = {layer: list(v) for layer, v in state["last_top1"].items()}
