"""The batch types of RL: a rollout batch as sampled and scored (`Rollout`), and its rows packed into next-token
training tensors (`Packed`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glasslab.envs.base import Problem
from glasslab.rl.hacking import repeat_rate
from glasslab.rl.losses import zero_std_groups


@dataclass
class Rollout:
    """One batch of sampled completions. Rows are grouped: rows g*G .. g*G+G-1 answer problems[g*G]."""

    problems: list[Problem]  # one per row
    prompts: list[list[int]]
    completions: list[list[int]]  # generated tokens, stop token included, forced tool results included
    sampled: list[list[bool]]  # False for forced tokens: they are not the policy's and are never trained on
    logprobs: list[list[float]]  # log p(token) at temperature 1, recorded while sampling
    truncated: list[bool]  # hit max_new_tokens before <|end|>
    texts: list[str]
    scores: dict[str, list[float]]  # reward function -> value per row
    rewards: Tensor  # (B,) the weighted sum of the scores
    group_size: int
    generation_s: float
    index: int  # which rollout batch of the run (its seed: RolloutObjective.batch_seed)
    # log π_old of the sampled tokens per row, from the policy that sampled them, when the loss needs π_old
    # (GRPO with num_iterations > 1 or rl.generate_ahead); None otherwise
    old: list[list[float]] | None = None
    # with rl.generate_ahead: log π_ref of the sampled tokens of the rows the loss trains on (trained_rows), the
    # time it took, and whether the sampling process scored them (else the trainer did); None until scored
    ref: list[list[float]] | None = None
    reference_s: float = 0.0
    ref_ahead: bool = False
    wait_s: float | None = None  # with rl.generate_ahead: how long the trainer waited for this batch

    def __len__(self) -> int:
        return len(self.completions)

    def metrics(self) -> dict[str, float]:
        """Statistics of what was sampled: rewards, lengths, truncation, generation time."""
        lengths = [len(c) for c in self.completions]
        out = {
            "rl/reward_mean": self.rewards.mean().item(),
            "rl/reward_std": self.rewards.std().item() if len(self) > 1 else 0.0,
            "rl/frac_reward_zero_std": zero_std_groups(self.rewards, self.group_size).float().mean().item(),
            "rl/completion_len_mean": sum(lengths) / len(lengths),
            "rl/completion_len_min": float(min(lengths)),
            "rl/completion_len_max": float(max(lengths)),
            "rl/truncated_ratio": sum(self.truncated) / len(self),
            "rl/repeat_rate": sum(map(repeat_rate, self.completions)) / len(self),
            "time/generation_s": self.generation_s,
        }
        if self.wait_s is not None:  # sampled ahead: how long the trainer waited, and who scored the reference
            out["time/rollout_wait_s"] = self.wait_s
            out["rl/reference_scored_ahead"] = float(self.ref_ahead)
        out |= {f"rl/reward/{name}": sum(v) / len(v) for name, v in self.scores.items()}
        return out

    def records(self, **columns: list) -> list[dict]:
        """One JSON-able row per completion (for the rollout tables), with extra per-row columns."""
        return [
            {
                "group": r // self.group_size,
                "prompt": self.problems[r].prompt,
                "answer": self.problems[r].answer,
                "completion": self.texts[r],
                "reward": self.rewards[r].item(),
                "scores": {name: v[r] for name, v in self.scores.items()},
                "length": len(self.completions[r]),
                "truncated": self.truncated[r],
                **{k: v[r] for k, v in columns.items()},
            }
            for r in range(len(self))
        ]


@dataclass
class Packed:
    """Prompt + completion per row, right-padded, as next-token inputs/targets. Padding only ever follows a
    row's real tokens, so plain causal attention computes each row exactly as it would alone.
    `mask` marks targets that are sampled completion tokens: the only ones a policy loss sees."""

    inputs: Tensor  # (B, L)
    targets: Tensor  # (B, L)
    mask: Tensor  # (B, L) bool
    prompts: list[list[int]]  # per row: inputs[r, :len(prompts[r])]

    def select(self, keep: Tensor) -> Packed:
        """The rows where `keep` (B,) is True."""
        rows = keep.nonzero().squeeze(1)
        return Packed(self.inputs[rows], self.targets[rows], self.mask[rows], [self.prompts[r] for r in rows.tolist()])

    def spread(self, per_row: list[list[float]]) -> Tensor:
        """Per-row values of the masked tokens (in order) laid out at their positions, 0 elsewhere."""
        return self.scatter(torch.tensor([v for row in per_row for v in row], device=self.mask.device))

    def scatter(self, values: Tensor) -> Tensor:
        """(N,) values of the N masked positions in row-major order, laid out (B, L) with 0 elsewhere; gradients
        flow back to `values`."""
        return values.new_zeros(self.mask.shape).masked_scatter(self.mask, values)


def pack(
    prompts: list[list[int]], completions: list[list[int]], sampled: list[list[bool]], pad_id: int, device: torch.device
) -> Packed:
    width = max(len(p) + len(c) for p, c in zip(prompts, completions)) - 1
    inputs = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    targets = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for r, (p, c, s) in enumerate(zip(prompts, completions, sampled)):
        seq = torch.tensor(p + c, dtype=torch.long)
        inputs[r, : len(seq) - 1], targets[r, : len(seq) - 1] = seq[:-1], seq[1:]
        mask[r, len(p) - 1 : len(p) - 1 + len(c)] = torch.tensor(s, dtype=torch.bool)
    return Packed(inputs.to(device), targets.to(device), mask.to(device), prompts)


def sampled_logprobs(rollout: Rollout) -> list[list[float]]:
    """The recorded log-probs of the sampled tokens only, per row, in the order `Packed.spread` expects."""
    return [[lp for lp, s in zip(lps, ss) if s] for lps, ss in zip(rollout.logprobs, rollout.sampled)]
