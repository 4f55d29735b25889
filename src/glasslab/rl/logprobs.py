"""The log-prob forward of RL: the logits of exactly the trained positions of a packed batch, with each group's
shared prompt computed once. The policy's loss, the reference and the old policy all go through it, so their
log-probs come from the same arithmetic."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from glasslab.model.generate import PromptBatch
from glasslab.model.gpt import PrefixCache
from glasslab.rl.batch import Packed
from glasslab.rl.losses import token_logprobs


def completion_logits(model: nn.Module, packed: Packed, temperature: float) -> Tensor:
    """Logits (N, V) of the N trained positions (`packed.mask`, row-major) at the sampling temperature (the policy
    that RL optimises is π(·/T)). The policy's loss and the reference and old log-probs all start here, so at
    step 0 the policy and its reference agree to the bit.

    Two forwards, both through `model(...)` (so a DDP wrapper sees them): the distinct prompts but their last
    token, once, then every row's last prompt token and completion, attending to its prompt's keys and values
    (`PrefixCache`, gradients included). A group's G rows share one prompt, so its tokens are computed once
    instead of G times. The head, log-softmax and entropy run on the trained positions alone."""
    device = packed.mask.device
    pb = PromptBatch.of([p[:-1] for p in packed.prompts], 0, device)
    cache = PrefixCache(pb.rows)
    if pb.idx.size(1):  # (with one-token prompts there is nothing to share: the cache stays empty)
        model(pb.idx, positions=pb.positions, mask=pb.mask, cache=cache, select=pb.rows[:0])
    start = torch.tensor([len(p) - 1 for p in packed.prompts], device=device)  # each row's last prompt token
    r, t = packed.mask.nonzero().unbind(1)
    W = int((t - start[r]).max()) + 1 if len(t) else 1
    positions = start[:, None] + torch.arange(W, device=device)
    inputs = packed.inputs.gather(1, positions.clamp(max=packed.inputs.size(1) - 1))  # clamped: padding anyway
    causal = torch.ones(W, W, dtype=torch.bool, device=device).tril().expand(len(start), -1, -1)
    mask = torch.cat([pb.valid[pb.rows][:, None, :].expand(-1, W, -1), causal], dim=2)[:, None]
    logits = model(inputs, positions=positions, mask=mask, cache=cache, select=r * W + t - start[r])
    return logits if temperature == 1.0 else logits / temperature


def sequence_logprobs(model: nn.Module, packed: Packed, temperature: float) -> Tensor:
    """log π(token) at the sampling temperature of every trained target (`packed.mask`), 0 elsewhere: (B, L)."""
    return packed.scatter(token_logprobs(completion_logits(model, packed, temperature), packed.targets[packed.mask]))
