"""Gradient, weight and update norms per parameter tensor and per block, and AdamW moment norms.

The update is measured, not inferred: on a probe step the weights are copied in on_backward and diffed in
on_optimizer_step, so weight decay, clipping, Adam's bias correction and Muon's orthogonalisation are all in it.
Off-steps do nothing at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from glasslab.probes.names import groups_of, param_key
from glasslab.track.layout import (
    ADAM_M_NORM,
    ADAM_V_NORM,
    GRAD_NORM,
    UPDATE_NORM,
    UPDATE_RATIO,
    WEIGHT_NORM,
    metric,
)
from glasslab.train.loop import Hook, StepContext


def trained_parameters(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """(metric keys, parameters); a tied weight appears once, under its first name."""
    named = [(param_key(n), p) for n, p in model.named_parameters() if p.requires_grad]
    return [k for k, _ in named], [p for _, p in named]


def tensor_norms(tensors: list[Tensor | None]) -> tuple[Tensor, Tensor]:
    """L2 norm of each tensor in one fused call, and a mask of which were present (None -> norm 0, absent)."""
    present = torch.tensor([t is not None for t in tensors])
    out = torch.zeros(len(tensors))
    kept = [t.detach() for t in tensors if t is not None]
    if kept:
        out[present] = torch.stack(torch._foreach_norm(kept)).float().cpu()
    return out, present


class Aggregator:
    """Combines per-tensor norms into per-group norms: the root of the sum of squares, one matmul."""

    def __init__(self, keys: list[str], group_fn: Callable[[str], list[str]]) -> None:
        self.names = list(dict.fromkeys(g for k in keys for g in group_fn(k)))
        index = {g: i for i, g in enumerate(self.names)}
        self.matrix = torch.zeros(len(self.names), len(keys))
        for j, k in enumerate(keys):
            for g in group_fn(k):
                self.matrix[index[g], j] = 1.0

    def __call__(self, norms: Tensor, present: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Group norms, and which groups have at least one present member."""
        mask = torch.ones_like(norms) if present is None else present.float()
        return (self.matrix @ (norms.square() * mask)).sqrt(), (self.matrix @ mask) > 0


class GradProbe(Hook):
    """Every `every` steps: grad_norm, weight_norm, update_norm, update_ratio, adam_m_norm, adam_v_norm for
    each parameter tensor and each module group. The global pre-clip norm and clipping are the loop's
    `optim/grad_norm` and `optim/clipped`. Weight norms and ratios use the weights before the update.

    No state across steps (the weights copied in on_backward are diffed and dropped within the step). It reads
    raw gradients, so it runs early (`order`)."""

    order = -10

    def __init__(self, every: int) -> None:
        self.every = every
        self._before: list[Tensor] | None = None

    def on_train_start(self, ctx: StepContext) -> None:
        self.keys, self.params = trained_parameters(ctx.model)
        self.groups = Aggregator(self.keys, groups_of)

    @torch.no_grad()
    def on_backward(self, ctx: StepContext) -> None:
        if (ctx.step + 1) % self.every:  # ctx.step is the number of finished steps; this one logs as step + 1
            return
        self._grad = tensor_norms([p.grad for p in self.params])
        self._weight = tensor_norms(self.params)
        self._before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def on_optimizer_step(self, ctx: StepContext) -> None:
        if self._before is None:
            return
        update = tensor_norms(torch._foreach_sub([p.detach() for p in self.params], self._before))
        self._before = None
        state = ctx.optimizer.state
        moments = {
            ADAM_M_NORM: tensor_norms([state.get(p, {}).get("exp_avg") for p in self.params]),
            ADAM_V_NORM: tensor_norms([state.get(p, {}).get("exp_avg_sq") for p in self.params]),
        }
        kinds = {GRAD_NORM: self._grad, WEIGHT_NORM: self._weight, UPDATE_NORM: update, **moments}
        for kind, (norms, present) in kinds.items():
            ctx.metrics.update(_named(kind, self.keys, norms, present))
            ctx.metrics.update(_named(kind, self.groups.names, *self.groups(norms, present)))
        for names, (u, up), (w, wp) in (
            (self.keys, update, self._weight),
            (self.groups.names, self.groups(*update), self.groups(*self._weight)),
        ):
            ok = up & wp & (w > 0)
            ctx.metrics.update(_named(UPDATE_RATIO, names, u / w.clamp_min(1e-30), ok))


def _named(kind: str, names: list[str], values: Tensor, present: Tensor) -> dict[str, float]:
    return {metric(kind, n): v for n, v, keep in zip(names, values.tolist(), present.tolist()) if keep}
