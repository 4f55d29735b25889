"""Optimisers and learning-rate schedules.

AdamW is torch's own (fused on CUDA, foreach elsewhere). Muon orthogonalises the momentum of each hidden weight
matrix (each expert's own, for stacked MoE expert weights) with a Newton-Schulz iteration; embeddings, the output head and the norm gains stay on AdamW, inside the
same optimizer object so one state_dict checkpoints both. Both keep AdamW moments under torch's names
(`exp_avg`, `exp_avg_sq`) so the update probes read them the same way.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor, nn

from glasslab.config import TrainConfig
from glasslab.train.precision import fast_bf16


def newton_schulz(g: Tensor, steps: int = 5) -> Tensor:
    """Approximately U Vᵀ from the SVD of each matrix g[..., :, :]: a quintic iteration tuned to push singular
    values towards 1 fast. In bfloat16 where the hardware multiplies it fast, as Muon's authors run it: the
    iteration only needs singular values near 1, not precise ones."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if fast_bf16(g.device.type) else torch.float32)
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


def orthogonalised(mats: list[Tensor]) -> list[Tensor]:
    """`newton_schulz` of each matrix, all those of one shape in one batched call: the tiny model's 24 hidden
    matrices in 2 calls instead of 24, since on CPU the cost of many small calls is mostly per call."""
    by_shape: dict[torch.Size, list[int]] = defaultdict(list)
    for i, m in enumerate(mats):
        by_shape[m.shape].append(i)
    out: dict[int, Tensor] = {}
    for rows in by_shape.values():
        out.update(zip(rows, newton_schulz(torch.stack([mats[i] for i in rows]))))
    return [out[i] for i in range(len(mats))]


class Muon(torch.optim.Optimizer):
    """Muon for groups flagged `muon=True`, AdamW for the rest."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float, momentum: float):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self, closure=None) -> None:  # noqa: ANN001 - torch's signature
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            if not group["muon"]:
                for p in params:
                    self._adamw(p, self.state[p], group)
                continue
            nesterov = []
            for p in params:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                nesterov.append(p.grad.add(buf, alpha=group["momentum"]))
            for p, update in zip(params, orthogonalised(nesterov) if nesterov else []):
                p.add_(update, alpha=-group["lr"] * max(1.0, p.size(-2) / p.size(-1)) ** 0.5)

    @staticmethod
    def _adamw(p: Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = torch.zeros(())
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**t))


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Weight decay on matrices only; with Muon, the hidden (block) matrices go to Muon."""
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            no_decay.append(p)
        elif cfg.optimizer == "muon" and name.startswith("blocks."):
            muon.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
    ]
    if muon:
        groups.append({"params": muon, "weight_decay": cfg.weight_decay, "base_lr": cfg.muon_lr, "muon": True})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        return Muon(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, momentum=cfg.muon_momentum)
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps, fused=on_cuda, foreach=not on_cuda)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then the schedule's decay from 1 to min_lr_ratio over the remaining steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_start = cfg.steps * (1 - cfg.decay_fraction)
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1.0, cfg.steps - decay_start)
        return 1.0 - (1.0 - floor) * progress
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Apply the schedule to every group; returns the AdamW-side learning rate for logging."""
    mult = lr_multiplier(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * mult
    return cfg.lr * mult
