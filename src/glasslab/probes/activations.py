"""Residual-stream and output-logit statistics: where activations grow, and where outlier features appear."""

from __future__ import annotations

import torch
from torch import Tensor


def activation_stats(x: Tensor) -> Tensor:
    """[rms, max |x|, kurtosis] of a block's output over all its elements. Kurtosis is E[(x-μ)⁴]/σ⁴
    (3 for a Gaussian); it grows when a few channels carry outsized values (outlier features)."""
    x = x.detach().float()
    centred = x - x.mean()
    var = centred.square().mean()
    return torch.stack([x.square().mean().sqrt(), x.abs().max(), centred.pow(4).mean() / var.square()])


def logit_stats(logits: Tensor) -> dict[str, Tensor]:
    """The largest output logit, and the mean log-partition log Σ exp(logits) over positions (what z-loss
    pushes towards 0; its drift is the usual sign of output-logit divergence)."""
    logits = logits.detach().float()
    return {"logits/max": logits.max(), "logits/log_z_mean": torch.logsumexp(logits, dim=-1).mean()}
