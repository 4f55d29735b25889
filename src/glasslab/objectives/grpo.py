"""GRPO (Shao et al. 2024, DeepSeekMath) as an `Objective` of the one training loop, with the variants that
followed it: Dr. GRPO's unscaled advantages and constant normaliser, DAPO's token-level mean, clip-higher and
dropping of groups without signal.

next_batch draws a rollout batch (all prompts x G completions in one generation), scores it, computes group
advantages, the reference log-probs and, when the batch is used for several steps, the old log-probs, all
once per batch; loss runs the policy forward and the clipped surrogate + β·KL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from glasslab.objectives.rollouts import RolloutObjective
from glasslab.rl.batch import Packed, Rollout, pack, sampled_logprobs
from glasslab.rl.logprobs import completion_logits
from glasslab.rl.losses import aggregate, group_advantages, grpo_token_loss, token_logprobs_and_entropy, zero_std_groups


@dataclass
class GRPOBatch:
    rollout: Rollout
    advantages: Tensor  # (B,) every row, for the tables
    kept: Tensor  # (B,) bool: rows trained on (groups with no reward variance may be dropped)
    packed: Packed  # the kept rows
    ref_logp: Tensor  # (B_kept, L)
    old_logp: Tensor | None  # (B_kept, L); None when π_old is the current policy (rollout.old is None)
    metrics: dict[str, float]  # rollout statistics: logged with the first step on this batch only
    uses: int = 1
    ready_at: float = field(default_factory=time.perf_counter)

    def records(self) -> list[dict]:
        return self.rollout.records(advantage=self.advantages.tolist(), trained=self.kept.tolist())


class GRPO(RolloutObjective):
    """Group Relative Policy Optimization. See GRPOConfig for its own options, RLConfig for the shared ones."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch: GRPOBatch | None = None
        self._restore: dict | None = None  # a stored batch from a checkpoint, rebuilt at the next next_batch

    def next_batch(self, model: nn.Module) -> GRPOBatch:
        if self._restore is not None:
            self.batch, self._restore = self._restored(self._restore), None
        if self.batch is not None and self.batch.uses < self.cfg.grpo.num_iterations:
            self.batch.uses += 1
            self.batch.metrics = {}
            self.batch.ready_at = time.perf_counter()
            return self.batch
        self.batch = self._prepare(self.draw(model))
        return self.batch

    def sample(self, model: nn.Module) -> Rollout:
        """A rollout batch and, when the loss needs π_old (num_iterations > 1, or sampled ahead by an older
        policy), its log-probs under the policy that sampled them. Those recorded while sampling are π_old's at
        temperature 1, in float32. Tempered sampling needs a no-grad forward of the sampling policy instead. So
        does a bfloat16 step with the policy itself as π_old, so that its first ratio is exactly 1: its loss sees
        log-probs that differ slightly from float32 ones. Sampled ahead, the ratio already corrects a whole
        optimizer step (rl/kl_old), a larger difference, and the recorded log-probs spare the sampling
        process a forward that would make generation the step's bottleneck."""
        rollout = self.rollout(model)
        cfg = self.cfg
        if cfg.grpo.num_iterations > 1 or cfg.generate_ahead:
            bf16_first_ratio = torch.is_autocast_enabled(self.device.type) and not cfg.generate_ahead
            recorded = cfg.temperature == 1.0 and not bf16_first_ratio
            rollout.old = sampled_logprobs(rollout) if recorded else self.row_logprobs(model, rollout)
        return rollout

    def _kept(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """(groups without reward variance (G,), rows trained on (B,)): the former are dropped if drop_zero_std."""
        g = self.cfg.group_size
        flat = zero_std_groups(rollout.rewards, g)
        if not self.cfg.grpo.drop_zero_std:
            return flat, torch.ones_like(rollout.rewards, dtype=torch.bool)
        return flat, ~flat.repeat_interleave(g)

    def trained_rows(self, rollout: Rollout) -> list[int]:
        return self._kept(rollout)[1].nonzero().squeeze(1).tolist()

    def _prepare(self, rollout: Rollout) -> GRPOBatch:
        """Advantages, dropped groups, packed tensors and reference log-probs: everything the batch's steps
        need, computed once."""
        cfg = self.cfg
        advantages = group_advantages(rollout.rewards, cfg.group_size, cfg.grpo.scale_rewards)
        flat, kept = self._kept(rollout)
        packed = pack(rollout.prompts, rollout.completions, rollout.sampled, self.tok.pad_id, self.device)
        old_logp = packed.spread(rollout.old)[kept] if rollout.old is not None else None
        packed = packed.select(kept)
        t0 = time.perf_counter()
        ahead_ref = None
        if cfg.generate_ahead:  # scored in the sampling process, or here by the same computation (rl/ahead.py)
            if rollout.ref is None:
                self.score_reference(rollout)
            ahead_ref = packed.spread(rollout.ref)
        if cfg.grpo.mask_truncated:
            packed.mask &= ~torch.tensor(rollout.truncated, device=self.device)[kept].unsqueeze(1)
        if ahead_ref is not None:
            ref_logp = ahead_ref * packed.mask  # 0 where not trained, as the forward below gives
        else:
            ref_logp = (
                self.reference_logprobs(packed) if kept.any() else torch.zeros(packed.mask.shape, device=self.device)
            )
        metrics = rollout.metrics() | {
            "rl/advantage_min": advantages.min().item(),
            "rl/advantage_mean": advantages.mean().item(),
            "rl/advantage_max": advantages.max().item(),
            "rl/groups_dropped": float(flat.sum()) if cfg.grpo.drop_zero_std else 0.0,
            "time/reference_s": rollout.reference_s if cfg.generate_ahead else time.perf_counter() - t0,
        }
        return GRPOBatch(rollout, advantages, kept, packed, ref_logp, old_logp, metrics)

    def _token_loss(self, model: nn.Module, batch: GRPOBatch) -> tuple[Tensor, dict[str, float]]:
        cfg, packed = self.cfg, batch.packed
        logits = completion_logits(model, packed, cfg.temperature)
        logp, entropy = token_logprobs_and_entropy(logits, packed.targets[packed.mask])
        return grpo_token_loss(
            packed.scatter(logp),
            batch.old_logp,
            batch.ref_logp,
            batch.advantages[batch.kept],
            packed.mask,
            eps_low=cfg.grpo.eps_low,
            eps_high=cfg.grpo.eps_high,
            beta=cfg.grpo.beta,
            kl_estimator=cfg.grpo.kl_estimator,
            entropy=packed.scatter(entropy if cfg.grpo.entropy_coef else entropy.detach()),
            entropy_coef=cfg.grpo.entropy_coef,
        )

    def loss(self, model: nn.Module, batch: GRPOBatch) -> tuple[Tensor, dict[str, float]]:
        if not batch.kept.any():  # every group was dropped: nothing to learn from this batch
            return torch.zeros((), device=self.device, requires_grad=True), {"train/loss": 0.0, **batch.metrics}
        per_token, stats = self._token_loss(model, batch)
        loss = aggregate(per_token, batch.packed.mask, self.cfg.grpo.loss_type, self.cfg.max_new_tokens)
        return loss, {"train/loss": loss.item(), **stats, **batch.metrics}

    @torch.no_grad()
    def token_losses(self, model: nn.Module, batch: GRPOBatch) -> Tensor:
        """Each trained token's share of the loss before aggregation (NaN elsewhere): what the spike probe ranks."""
        per_token, _ = self._token_loss(model, batch)
        return per_token.masked_fill(~batch.packed.mask, float("nan"))

    def batch_ids(self, batch: GRPOBatch) -> tuple[Tensor, Tensor]:
        return batch.packed.inputs, batch.packed.targets

    def batch_tokens(self, batch: GRPOBatch) -> int:
        """Generated tokens trained on in this step (what throughput/tokens_per_s counts for RL)."""
        return sum(len(c) for c in batch.rollout.completions)

    def state_dict(self) -> dict:
        """Also, while a batch still has iterations to go, that batch, so a resumed run repeats the same steps."""
        b = self.batch
        pending = (
            self.rollout_state(b.rollout) | {"uses": b.uses}
            if b is not None and b.uses < self.cfg.grpo.num_iterations
            else None
        )
        return super().state_dict() | {"pending": pending}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.batch, self._restore = None, state.get("pending")

    def _restored(self, s: dict) -> GRPOBatch:
        # (checkpoints written before batches recorded their index hold the latest one: rollouts - 1)
        batch = self._prepare(self.restore_rollout({"index": self.rollouts - 1} | s))
        batch.uses = s["uses"]
        return batch
