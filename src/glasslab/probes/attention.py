"""Attention statistics per layer and head, from the exact q, k the model attends with.

The model attends through `F.scaled_dot_product_attention`, which never materialises the attention matrix.
On probe steps a forward hook on each `AttentionCore` receives its (q, k, v, mask) and recomputes
softmax(q kᵀ/√d + mask) explicitly: the same numbers SDPA uses (tests check probs @ v == the core's output).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def attention_probs(q: Tensor, k: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(pre-softmax logits, probabilities, allowed), each (B, H, T, S), as SDPA computes them: scale 1/√d,
    key heads repeated for grouped-query attention, causal (top-left aligned) when there is no mask,
    else the boolean `mask` (True = attend). Disallowed logits are -inf; a query with no key gets zeros."""
    B, H, T, D = q.shape
    k = k.repeat_interleave(H // k.size(1), dim=1)
    S = k.size(2)
    logits = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(D)
    if mask is None:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    else:
        allowed = mask.bool()
    allowed = allowed.expand(B, H, T, S)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return logits, probs, allowed


def attention_stats(logits: Tensor, probs: Tensor, allowed: Tensor) -> dict[str, Tensor]:
    """Per-head (H,) statistics, averaged over the batch rows and over every query that attends to at least
    two keys (a query with one key has entropy 0 by construction and would only dilute the means):
      entropy       -Σ p log p in nats
      entropy_norm  entropy / log(number of keys the query may attend): 1 = uniform, 0 = one key
      max_logit     the largest pre-softmax logit q·k/√d over all allowed pairs (every query)
      sink          attention mass on the first key position"""
    n_keys = allowed.sum(-1)  # (B, H, T)
    valid = (n_keys >= 2).float()
    count = valid.sum((0, 2)).clamp_min(1.0)
    entropy = torch.special.entr(probs).sum(-1)
    norm = entropy / n_keys.clamp_min(2).float().log()
    return {
        "entropy": (entropy * valid).sum((0, 2)) / count,
        "entropy_norm": (norm * valid).sum((0, 2)) / count,
        "max_logit": logits.amax(dim=(0, 2, 3)),
        "sink": (probs[..., 0] * valid).sum((0, 2)) / count,
    }
