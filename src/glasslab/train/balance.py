"""Auxiliary-loss-free load balancing (DeepSeek-V3): after each optimizer step, every MoE router's selection bias
moves by ±γ towards balance, from the step's assignment counts summed over all ranks, so every rank applies the
same update and the biases stay identical under torchrun."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from glasslab.config import ModelConfig
from glasslab.model.moe import bias_step, moe_layers
from glasslab.train.loop import Hook, StepContext


class BiasBalancing(Hook):
    """bias_e += γ · sign(mean load - load_e) after each optimizer step; the load is the step's assignments
    (every micro-batch, every rank). The biases are router buffers: checkpoints hold them, so a resume is exact."""

    every_rank = True  # it changes what is trained: every rank updates its own copy of the biases

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def on_optimizer_step(self, ctx: StepContext) -> None:
        update_biases(ctx.model, self.rate)

    def state_dict(self) -> dict:
        """Nothing to keep: the biases live in the model's state and the load is emptied every step."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Stateless (see state_dict)."""


def update_biases(model: nn.Module, rate: float) -> None:
    """Apply one bias update to every MoE layer that counted assignments since the last one, and reset the count."""
    for layer in moe_layers(model).values():
        if layer.load is None:
            continue
        load = layer.load.clone()
        if dist.is_initialized():
            dist.all_reduce(load)
        layer.router.bias += bias_step(load, rate)
        layer.load = None


def balancing_hooks(cfg: ModelConfig) -> list[Hook]:
    """The hooks a stage adds for its model's MoE balancing: BiasBalancing when bias_rate > 0."""
    return [BiasBalancing(cfg.moe.bias_rate)] if cfg.moe.n_experts and cfg.moe.bias_rate else []
