"""Validation loss by token position: does the model use its context (loss falls with position), and how fast?

Buckets are log-spaced (0, 1, 2-3, 4-7, ...), as in the context-length literature: loss changes fastest over the
first positions, which equal-width buckets would average away. Each bucket's value is the mean over validation
windows of the window's mean loss in the bucket, with a 95% t-interval over windows: token losses within a window
are correlated, windows far apart in the text much less, so an interval over windows does not overstate precision.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch import nn

from glasslab.probes.forward import eval_mode
from glasslab.track.layout import LOSS_BY_POS, LOSS_BY_POS_CI95, metric
from glasslab.train.loop import Hook, StepContext
from glasslab.train.protocols import PositionBatches, TokenLosses, ValBatches


def position_buckets(length: int) -> list[tuple[int, int]]:
    """Log-spaced (first, last) position ranges covering 0..length-1: (0, 0), (1, 1), (2, 3), (4, 7), ..."""
    out, first = [(0, 0)], 1
    while first < length:
        out.append((first, min(2 * first, length) - 1))
        first *= 2
    return out


def bucket_name(first: int, last: int, length: int, family: str = LOSS_BY_POS) -> str:
    """`loss_by_pos/004-007`: zero-padded inclusive positions, so names sort and parse as numbers."""
    width = max(3, len(str(length - 1)))
    return metric(family, f"{first:0{width}d}-{last:0{width}d}")


def bucket_stats(losses: np.ndarray) -> dict[tuple[int, int], tuple[float, float, int]]:
    """Per bucket of a (windows, positions) loss array (NaN = not trained on): (mean over windows of each window's
    mean over its trained positions in the bucket, half-width of the 95% t-interval of that mean, windows).
    Windows with no trained position in a bucket are left out of it; a bucket with one window has no interval (NaN)."""
    out = {}
    for first, last in position_buckets(losses.shape[1]):
        part = losses[:, first : last + 1]
        trained = ~np.isnan(part).all(axis=1)
        if not trained.any():
            continue
        means = np.nanmean(part[trained], axis=1)
        n = len(means)
        half = stats.t.ppf(0.975, n - 1) * means.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
        out[(first, last)] = (float(means.mean()), float(half), n)
    return out


@torch.no_grad()
def window_losses(model: nn.Module, objective: TokenLosses, windows: int) -> np.ndarray:
    """(windows, positions) per-token validation losses in nats, NaN where nothing is trained (padding, prompts).
    The objective's `position_batches(windows)` when it has one (pretraining: more windows than its validation
    loss reads), else its validation batches."""
    batches = objective.position_batches(windows) if isinstance(objective, PositionBatches) else objective.val_batches()
    rows = []
    with eval_mode(model):
        for batch in batches:  # batches may differ in length (padded chat data)
            rows += list(objective.token_losses(model, batch).double().cpu().numpy())
    out = np.full((len(rows), max(map(len, rows))), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


class LossByPosition(Hook):
    """Loss by position bucket and its 95% interval (`loss_by_pos/<first>-<last>`, `loss_by_pos_ci95/...`, nats),
    every `every` steps (0: none besides) and at the last step, measured after the step's update. Positions whose
    target is not trained on (NaN from token_losses) are left out. No state across steps."""

    def __init__(self, every: int, windows: int) -> None:
        self.every, self.windows = every, windows

    def on_optimizer_step(self, ctx: StepContext) -> None:
        objective = ctx.objective
        if not (isinstance(objective, TokenLosses) and isinstance(objective, ValBatches)):
            return
        if not ((self.every and ctx.step % self.every == 0) or ctx.step == ctx.cfg.steps):
            return
        losses = window_losses(ctx.model, objective, self.windows)
        length = losses.shape[1]
        for (first, last), (mean, half, _) in bucket_stats(losses).items():
            ctx.metrics[bucket_name(first, last, length)] = mean
            if math.isfinite(half):
                ctx.metrics[bucket_name(first, last, length, LOSS_BY_POS_CI95)] = half
