"""Validation loss by token position: does the model use its context (loss falls with position), and where
does a long-context problem start?"""

from __future__ import annotations

import numpy as np
import torch

from glasslab.probes.forward import eval_mode
from glasslab.train.loop import Hook, StepContext
from glasslab.train.protocols import TokenLosses, ValBatches


def position_buckets(length: int, buckets: int) -> list[tuple[int, int]]:
    """`buckets` contiguous, near-equal (first, last) position ranges covering 0..length-1."""
    edges = np.linspace(0, length, min(buckets, length) + 1).round().astype(int)
    return [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:])]


def bucket_name(first: int, last: int, length: int) -> str:
    """`loss_by_pos/000-015`: zero-padded inclusive positions, so names sort and parse as numbers."""
    width = max(3, len(str(length - 1)))
    return f"loss_by_pos/{first:0{width}d}-{last:0{width}d}"


class LossByPosition(Hook):
    """At every evaluation, the mean per-token loss over the objective's validation batches, per position bucket.
    Positions whose target is not trained on (NaN from token_losses) are left out of the means. No state across
    evaluations."""

    def __init__(self, buckets: int) -> None:
        self.buckets = buckets

    def on_eval(self, ctx: StepContext) -> None:
        objective = ctx.objective
        if not (isinstance(objective, TokenLosses) and isinstance(objective, ValBatches)):
            return
        sums, counts = torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
        with torch.no_grad(), eval_mode(ctx.model):
            for batch in objective.val_batches():  # batches may differ in length (padded chat data)
                losses = objective.token_losses(ctx.model, batch).double().cpu()
                if losses.size(1) > sums.numel():
                    sums, counts = _grow(sums, losses.size(1)), _grow(counts, losses.size(1))
                trained = ~losses.isnan()
                sums[: losses.size(1)] += losses.nan_to_num(0.0).sum(0)
                counts[: losses.size(1)] += trained.sum(0)
        length = sums.numel()
        for a, b in position_buckets(length, self.buckets):
            n = float(counts[a : b + 1].sum())
            if n:
                ctx.metrics[bucket_name(a, b, length)] = float(sums[a : b + 1].sum()) / n


def _grow(t: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(length - t.numel())])
