"""DPO (Rafailov et al. 2023) on preference pairs built from the environment, as an `Objective`.

Online, like GRPO: every step samples group_size answers to each of prompts_per_step problems from the current
policy and pairs the best-rewarded answer of a group (chosen) with its worst (rejected) when their rewards
differ; with the default weights that is a correct answer against an incorrect one. Groups whose answers all
score the same give no pair. The reference stays the frozen SFT model (or the latest reset, see
rl.ref_reset_every). Sequence log-probs sum the sampled tokens only: forced tool results are not the policy's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from glasslab.objectives.rollouts import RolloutObjective
from glasslab.rl.batch import Packed, Rollout
from glasslab.rl.logprobs import completion_logits
from glasslab.rl.losses import dpo_loss, kl_estimate, masked_mean, token_logprobs_and_entropy


@dataclass
class DPOBatch:
    rollout: Rollout
    chosen: list[int]  # row of the chosen answer, one per pair
    rejected: list[int]  # row of the rejected answer, same order
    packed: Packed | None  # chosen rows, then rejected rows (None without pairs)
    ref_logp: Tensor  # (2 * pairs, L) reference token log-probs
    metrics: dict[str, float]
    ready_at: float = field(default_factory=time.perf_counter)

    def records(self) -> list[dict]:
        role: list[str | None] = [None] * len(self.rollout)
        for c, r in zip(self.chosen, self.rejected):
            role[c], role[r] = "chosen", "rejected"
        return self.rollout.records(pair=role)


def preference_pairs(rewards: Tensor, group_size: int) -> tuple[list[int], list[int]]:
    """(chosen rows, rejected rows): per group, the highest-reward answer against the lowest, if they differ."""
    chosen, rejected = [], []
    for g, group in enumerate(rewards.view(-1, group_size)):
        best, worst = int(group.argmax()), int(group.argmin())
        if group[best] > group[worst]:
            chosen.append(g * group_size + best)
            rejected.append(g * group_size + worst)
    return chosen, rejected


class DPO(RolloutObjective):
    """Direct Preference Optimization on pairs the environment's rewards rank. See DPOConfig."""

    def trained_rows(self, rollout: Rollout) -> list[int]:
        chosen, rejected = preference_pairs(rollout.rewards, self.cfg.group_size)
        return chosen + rejected

    def next_batch(self, model: nn.Module) -> DPOBatch:
        rollout = self.draw(model)
        chosen, rejected = preference_pairs(rollout.rewards, self.cfg.group_size)
        rows = chosen + rejected  # trained_rows
        packed = self.pack_rows(rollout, rows) if rows else None
        t0 = time.perf_counter()
        if packed is None:
            ref_logp = torch.zeros(0)
        elif rollout.ref is not None:  # scored in the sampling process (rl.generate_ahead), as the line below would
            ref_logp = packed.spread(rollout.ref)
        else:
            ref_logp = self.reference_logprobs(packed)
        reference_s = rollout.reference_s if rollout.ref is not None else time.perf_counter() - t0
        metrics = rollout.metrics() | {"rl/dpo/pairs": float(len(chosen)), "time/reference_s": reference_s}
        return DPOBatch(rollout, chosen, rejected, packed, ref_logp, metrics)

    def loss(self, model: nn.Module, batch: DPOBatch) -> tuple[Tensor, dict[str, float]]:
        if not batch.chosen:  # no group had answers of different reward
            return torch.zeros((), device=self.device, requires_grad=True), {"train/loss": 0.0, **batch.metrics}
        p = batch.packed
        logp, entropy = token_logprobs_and_entropy(completion_logits(model, p, self.cfg.temperature), p.targets[p.mask])
        logp = p.scatter(logp)
        seq, ref_seq = (logp * p.mask).sum(1), (batch.ref_logp * p.mask).sum(1)
        n = len(batch.chosen)
        loss, chosen_r, rejected_r = dpo_loss(seq[:n], seq[n:], ref_seq[:n], ref_seq[n:], self.cfg.dpo.beta)
        return loss, {
            "train/loss": loss.item(),
            "rl/dpo/chosen_reward": chosen_r.mean().item(),
            "rl/dpo/rejected_reward": rejected_r.mean().item(),
            "rl/dpo/margin": (chosen_r - rejected_r).mean().item(),
            "rl/dpo/accuracy": (chosen_r > rejected_r).float().mean().item(),
            "rl/kl_ref": masked_mean(kl_estimate(logp.detach(), batch.ref_logp, "k3"), p.mask).item(),
            "rl/entropy": masked_mean(p.scatter(entropy.detach()), p.mask).item(),
            **batch.metrics,
        }

    def batch_tokens(self, batch: DPOBatch) -> int:
        """Generated tokens of the step's rollout (what throughput/tokens_per_s counts for RL)."""
        return sum(len(c) for c in batch.rollout.completions)
