"""Mixture-of-experts feed-forward: a router sends each token to `top_k` of `n_experts` small MLPs (plus optional
shared experts every token goes through), and the token's output is the gate-weighted sum of theirs.

Dispatch is batched: the (token, expert) assignments are sorted by expert, the rows gathered in that order, each
expert multiplies its contiguous block in one matmul, and the results are scattered back with `index_add_`. The
only Python loop is over experts, never over tokens.

The forward carries no instrumentation. The router (`blocks.i.mlp.router`) returns its whole decision as a
`Routing`, so a probe's forward hook sees exactly what the layer used. What training needs from a forward beyond
its output is kept on the layer in two plain attributes, filled only by training forwards (train mode, gradients
on), and emptied by their consumers:
  `balance_terms`  the Switch auxiliary loss and the router z-loss of each forward, as tensors in the graph;
                   the training loop adds them to the objective's loss (`add_router_losses`)
  `load`           assignments per expert since the last bias update; the `BiasBalancing` hook
                   (train/balance.py) reads it after each optimizer step, when auxiliary-loss-free balancing is on
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glasslab.config import MoEConfig


class Routing(NamedTuple):
    """One router decision for N tokens over E experts, k per token. Scores are float32 whatever the autocast."""

    logits: Tensor  # (N, E) router logits
    scores: Tensor  # (N, E) softmax probabilities, or independent sigmoid scores
    experts: Tensor  # (N, k) chosen experts: top-k of scores + bias
    gates: Tensor  # (N, k) weights of the chosen experts' outputs: their scores (renormalised), never the bias
    kept: Tensor | None  # (N, k) False where the expert was over capacity and dropped the assignment; None: dropless


def capacity(tokens: int, cfg: MoEConfig) -> int:
    """Assignments one expert accepts per forward: capacity_factor times its share under perfect balance."""
    return math.ceil(cfg.capacity_factor * tokens * cfg.top_k / cfg.n_experts)


def within_capacity(experts: Tensor, n_experts: int, limit: int) -> Tensor:
    """(N, k) bool: the assignments each expert accepts, first come first served, every token's first choice
    before any token's second (Switch Transformer's priority), tokens in order."""
    slot_major = experts.T.reshape(-1)
    onehot = F.one_hot(slot_major, n_experts)
    place = (onehot.cumsum(0) * onehot).sum(-1) - 1  # the assignment's position in its expert's queue
    return (place < limit).view(experts.size(1), experts.size(0)).T


def bias_step(load: Tensor, rate: float) -> Tensor:
    """DeepSeek-V3's auxiliary-loss-free update: +rate for an expert below the mean load, -rate above it, 0 at it."""
    return rate * torch.sign(load.float().mean() - load.float())


class Router(nn.Module):
    """Scores experts for each token and picks top_k, in float32 even under autocast (small logit differences
    decide the choice). `bias` (a buffer, so checkpoints hold it) shifts which experts are selected, never the gate
    values: the auxiliary-loss-free balancing of DeepSeek-V3."""

    def __init__(self, n_embd: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, n_embd))
        self.register_buffer("bias", torch.zeros(cfg.n_experts))

    def forward(self, x: Tensor) -> Routing:
        """x (N, C) -> the routing of those N tokens."""
        cfg = self.cfg
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
            scores = logits.softmax(-1) if cfg.score == "softmax" else logits.sigmoid()
            experts = (scores.detach() + self.bias).topk(cfg.top_k, dim=-1).indices
            gates = scores.gather(-1, experts)
            if cfg.renormalize and cfg.top_k > 1:
                gates = gates / gates.sum(-1, keepdim=True)
        kept = None
        if cfg.capacity_factor is not None:
            kept = within_capacity(experts, cfg.n_experts, capacity(x.size(0), cfg))
        return Routing(logits, scores, experts, gates, kept)


class Experts(nn.Module):
    """n_experts MLPs of one shape, their weights stacked: up (E, C, width·hidden), down (E, hidden, C)."""

    def __init__(self, n_experts: int, n_embd: int, hidden: int, act: Callable[[Tensor], Tensor], width: int) -> None:
        super().__init__()
        self.act = act
        self.up = nn.Parameter(torch.empty(n_experts, n_embd, width * hidden))
        self.down = nn.Parameter(torch.empty(n_experts, hidden, n_embd))

    def forward(self, rows: Tensor, counts: list[int]) -> Tensor:
        """rows (M, C) grouped by expert, counts[e] of them for expert e -> (M, C): one matmul per expert and layer,
        each expert's block carried through both layers before the one concatenation."""
        parts = zip(rows.split(counts), self.up, self.down)
        return torch.cat([self.act(part @ up) @ down for part, up, down in parts])


class MoE(nn.Module):
    """The mixture-of-experts MLP of one block: router, routed experts, optional shared MLP."""

    def __init__(
        self,
        n_embd: int,
        hidden: int,
        act: Callable[[Tensor], Tensor],
        width: int,
        cfg: MoEConfig,
        shared: nn.Module | None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(n_embd, cfg)
        self.experts = Experts(cfg.n_experts, n_embd, hidden, act, width)
        self.shared = shared
        self.balance_terms: list[tuple[Tensor, Tensor]] = []
        self.load: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        r = self.router(x)
        y = dispatch(x, r, self.experts, self.cfg.n_experts)
        if self.shared is not None:
            y = y + self.shared(x)
        cfg = self.cfg
        if self.training and torch.is_grad_enabled() and (cfg.bias_rate or cfg.aux_loss or cfg.z_loss):
            self._keep_for_training(r)
        return y.view(shape)

    def _keep_for_training(self, r: Routing) -> None:
        counts = torch.bincount(r.experts.flatten(), minlength=self.cfg.n_experts)
        if self.cfg.bias_rate:
            self.load = counts if self.load is None else self.load + counts
        if self.cfg.aux_loss or self.cfg.z_loss:
            z = router_z_loss(r.logits) if self.cfg.z_loss else r.logits.new_zeros(())
            self.balance_terms.append((switch_loss(r, counts), z))


def dispatch(x: Tensor, r: Routing, experts: Experts, n_experts: int) -> Tensor:
    """Σ_k gate_k · expert_k(x) per token, computed expert by expert on the sorted assignments. Dropped assignments
    are sorted past the last expert and never computed: a token with all of them dropped gets 0, so the block's
    residual passes it through unchanged."""
    k = r.experts.size(1)
    target = r.experts.flatten()
    if r.kept is not None:
        target = target.masked_fill(~r.kept.flatten(), n_experts)
    order = target.argsort(stable=True)
    counts = torch.bincount(target, minlength=n_experts + 1).tolist()
    routed = sum(counts[:n_experts])
    order = order[:routed]
    token = order // k
    out = experts(x.index_select(0, token), counts[:n_experts])
    weighted = out * r.gates.flatten().index_select(0, order).unsqueeze(1).to(out.dtype)
    return torch.zeros_like(x, dtype=weighted.dtype).index_add_(0, token, weighted).to(x.dtype)


def switch_loss(r: Routing, counts: Tensor) -> Tensor:
    """Switch Transformer's auxiliary loss E · Σ_e f_e · P_e: f_e the share of assignments to expert e (counted,
    no gradient), P_e the mean routing probability of e (sigmoid scores normalised per token). 1 at perfect
    balance, E when every token goes to one expert with certainty."""
    n_experts = r.scores.size(-1)
    probs = r.scores / r.scores.sum(-1, keepdim=True)
    share = counts.float() / counts.sum().clamp_min(1)
    return n_experts * (share * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's router z-loss: the mean squared log-partition of the router logits, keeping them small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """The model's MoE layers by block name (`blocks.2.mlp` -> `blocks.2`), unwrapping DDP / compile."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return {name.removesuffix(".mlp"): m for name, m in model.named_modules() if isinstance(m, MoE)}


def add_router_losses(model: nn.Module, loss: Tensor, parts: dict[str, float]) -> tuple[Tensor, dict[str, float]]:
    """The objective's loss plus aux_loss · (Switch loss) + z_loss · (router z-loss) of the training forwards since
    the last call, each summed over layers and averaged over the forwards (an RL step may run more than one);
    `parts` gains their values as train/moe_aux_loss and (when z_loss > 0) train/moe_z_loss. A dense model
    returns both unchanged."""
    aux, z = [], []
    for layer in moe_layers(model).values():
        if layer.balance_terms:
            a, b = zip(*layer.balance_terms)
            aux.append(torch.stack(a).mean())
            z.append(torch.stack(b).mean())
            layer.balance_terms = []
    if not aux:
        return loss, parts
    cfg = next(iter(moe_layers(model).values())).cfg
    aux_sum, z_sum = torch.stack(aux).sum(), torch.stack(z).sum()
    values = torch.stack([aux_sum, z_sum]).tolist()
    parts = {**parts, "train/moe_aux_loss": values[0]} | ({"train/moe_z_loss": values[1]} if cfg.z_loss else {})
    return loss + cfg.aux_loss * aux_sum + cfg.z_loss * z_sum, parts
