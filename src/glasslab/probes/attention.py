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


def attention_stats(logits: Tensor, probs: Tensor, allowed: Tensor, real: Tensor, bos: Tensor) -> dict[str, Tensor]:
    """Per-head (H,) statistics of the attention rows from `attention_probs`. `real` (B, S) marks the key and
    query positions holding real tokens (False = padding), `bos` (B, S) those holding <|bos|>.

    The keys a query can attend are those its mask allows (causal when the model gets none) that are not
    padding; n is their number. The means pool every (batch row, query) with a real token and n >= 2, over all
    rows alike: query 0 (n = 1, entropy 0 by construction) and padding queries are left out.
      entropy       -Σ p log p over the query's keys, nats
      entropy_norm  entropy / ln n: 1 = uniform over the keys it can attend, 0 = all mass on one key
      max_logit     the largest pre-softmax logit q·k/√d over every real query (query 0 included) and key it can
                    attend
      bos           Σ p over the <|bos|> keys the query can attend (the attention-sink mass), mean over the
                    pooled queries that have such a key in view; absent when none has one"""
    attendable = allowed & real[:, None, None, :]
    n_keys = attendable.sum(-1)  # (B, H, T)
    pooled = (n_keys >= 2) & real[:, None, :]
    entropy = torch.special.entr(probs).sum(-1)
    norm = entropy / n_keys.clamp_min(2).float().log()
    out = {
        "entropy": _mean(entropy, pooled),
        "entropy_norm": _mean(norm, pooled),
        "max_logit": logits.masked_fill(~(attendable & real[:, None, :, None]), -math.inf).amax(dim=(0, 2, 3)),
    }
    bos_keys = attendable & bos[:, None, None, :]
    sees_bos = pooled & bos_keys.any(-1)
    if sees_bos.any():
        out["bos"] = _mean((probs * bos_keys).sum(-1), sees_bos)
    return out


def _mean(values: Tensor, where: Tensor) -> Tensor:
    """Per-head mean of (B, H, T) `values` over the (row, query) pairs where `where` holds."""
    return (values * where).sum((0, 2)) / where.sum((0, 2)).clamp_min(1)
