"""Batched, seeded generation with a KV cache.

Prompts of different lengths are left-padded; each row gets its own positions and a key mask, so a padded row
computes exactly what it would alone. Every row advances one token per step: a token is either sampled or
*forced* (e.g. a tool's result, injected by an `Interceptor`), and the result records which, so RL can train on
sampled tokens only. Rows that share a prompt (GRPO's group) share its prefill, and a row that has finished
leaves the batch, so the remaining steps compute only the rows still going.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from glasslab.model.gpt import GPT, KVCache


class Interceptor(Protocol):
    """Sees each row's completion after every sampled token; may return tokens to force next (a tool result).
    Forcing tokens after a stop token keeps the row going, so a tool call can end with `<|end|>`."""

    def __call__(self, row: int, completion: list[int]) -> list[int] | None: ...


@dataclass
class Generation:
    tokens: list[list[int]]  # completion tokens per row (prompt excluded), stop token included when hit
    sampled: list[list[bool]]  # True where the token was sampled by the model, False where forced
    logprobs: list[list[float]]  # log p(token) under the model at temperature 1 (0.0 for forced tokens)
    truncated: list[bool] = field(default_factory=list)  # hit max_new_tokens before a stop token


def filter_logits(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering, on (B, V) logits."""
    logits = logits / max(temperature, 1e-6)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(probs: Tensor, gen: torch.Generator, block: int = 64) -> Tensor:
    """One draw per row from (B, V) probabilities (normalised or not) by inverting the CDF at a uniform draw.
    Exact sampling like `torch.multinomial`, which on CPU draws B·V exponentials for one sample (a sizeable share
    of a decode step at the recipe's batch and vocabulary); this draws B uniforms. The inversion runs in two
    levels: find the block of `block` tokens where the CDF crosses the draw, then the token inside it, so only
    B·V/block prefix sums are taken over the vocabulary (cheaper than a full float64 cumsum) and the draw is the
    same token a full-CDF inversion picks. Sums run in float64 so that even a token
    of probability 1e-12 keeps its share. Zero-probability tokens are never drawn: u' = 1 - u is in (0, 1], and
    the first index whose CDF reaches u'·total is never on a flat step of the CDF."""
    u = torch.rand(probs.size(0), 1, generator=gen, dtype=torch.float64, device=probs.device)
    return sample_at(probs, u, block)


def sample_at(probs: Tensor, u: Tensor, block: int = 64) -> Tensor:
    """`sample` at given (B, 1) float64 uniform draws: a server whose rows each follow their own seeded
    generator draws each row's uniform from it, then inverts every row's CDF in one batched call."""
    B, V = probs.shape
    padded = F.pad(probs, (0, -V % block)).view(B, -1, block)
    mass = padded.sum(-1, dtype=torch.float64)  # (B, blocks)
    cdf = mass.cumsum(-1)
    target = (1 - u) * cdf[:, -1:]
    j = torch.searchsorted(cdf, target).clamp_(max=cdf.size(1) - 1)  # the block, (B, 1)
    inside = padded[torch.arange(B, device=probs.device), j.squeeze(1)].double().cumsum(-1)  # (B, block)
    # What is left of the target past the blocks before j; capped at the block's own sum, which float64
    # rounding can leave a hair below it, so a block's zero-probability tail is never reached.
    rest = torch.minimum(target - (cdf.gather(1, j) - mass.gather(1, j)), inside[:, -1:])
    return (j * block + torch.searchsorted(inside, rest)).squeeze(1)


def _next_token(
    logits: Tensor, gen: torch.Generator, temperature: float, top_k: int | None, top_p: float | None
) -> tuple[Tensor, Tensor]:
    """The next token of every row (greedy when temperature == 0) and its log-prob at temperature 1."""
    if temperature == 1.0 and not top_k and (top_p is None or top_p >= 1.0):
        # Plain sampling, the RL case: one softmax serves both the draw and the recorded log-prob.
        probs = logits.softmax(-1)
        choice = sample(probs, gen)
        return choice, probs.gather(1, choice[:, None]).squeeze(1).log()
    if temperature == 0:
        choice = logits.argmax(-1)
    else:
        choice = sample(filter_logits(logits, temperature, top_k, top_p).softmax(-1), gen)
    return choice, F.log_softmax(logits, dim=-1).gather(1, choice[:, None]).squeeze(1)


@dataclass
class PromptBatch:
    """The distinct prompts of a batch, left-padded so every prompt ends in the last column, and which prompt each
    row continues: the input of a prefill that computes a prompt shared by several rows once."""

    idx: Tensor  # (P, T) token ids
    valid: Tensor  # (P, T) bool: False on left padding
    positions: Tensor  # (P, T) each prompt's own positions, 0 at its first token
    mask: Tensor  # (P, 1, T, T) bool: causal within each prompt, padding never attended
    rows: Tensor  # (B,) the prompt of each row

    @classmethod
    def of(cls, prompts: list[list[int]], pad_id: int, device: torch.device) -> PromptBatch:
        distinct = {p: i for i, p in enumerate(dict.fromkeys(map(tuple, prompts)))}
        width = max(map(len, distinct))
        idx = torch.full((len(distinct), width), pad_id, dtype=torch.long)
        valid = torch.zeros((len(distinct), width), dtype=torch.bool)
        for r, p in enumerate(distinct):
            idx[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            valid[r, width - len(p) :] = True
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        # Fully padded query rows would attend to nothing (NaN); let them see themselves, their output is unused.
        mask = (causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool)
        rows = torch.tensor([distinct[tuple(p)] for p in prompts])
        positions = (valid.cumsum(1) - 1).clamp(min=0)
        return cls(idx.to(device), valid.to(device), positions.to(device), mask[:, None].to(device), rows.to(device))


@torch.no_grad()
def generate(
    model: GPT,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: tuple[int, ...] = (),
    pad_id: int = 0,
    seed: int | None = None,
    interceptor: Interceptor | None = None,
) -> Generation:
    """Complete every prompt; greedy when temperature == 0."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    B = len(prompts)
    # Each distinct prompt is prefilled once, then repeated for the rows that share it (GRPO's G samples).
    pb = PromptBatch.of(prompts, pad_id, device)
    cache = KVCache(model, pb.idx.size(0), pb.idx.size(1) + max_new_tokens)
    was_training = model.training
    model.eval()
    logits = model(pb.idx, positions=pb.positions, mask=pb.mask, cache=cache)[pb.rows, -1]
    cache.select(pb.rows)
    keys = torch.cat([pb.valid[pb.rows], torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], dim=1)
    next_pos = pb.positions[pb.rows, -1] + 1

    out = Generation([[] for _ in range(B)], [[] for _ in range(B)], [[] for _ in range(B)], [False] * B)
    forced: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    active = list(range(B))  # the rows still generating, in the cache's row order
    for i in range(max_new_tokens):
        choice, chosen_logp = _next_token(logits, gen, temperature, top_k, top_p)
        step, step_logp = choice.tolist(), chosen_logp.tolist()
        for j, r in enumerate(active):
            if forced[r]:
                step[j] = forced[r].pop(0)
                out.sampled[r].append(False)
                out.logprobs[r].append(0.0)
            else:
                out.sampled[r].append(True)
                out.logprobs[r].append(step_logp[j])
            out.tokens[r].append(step[j])
            if not out.sampled[r][-1]:
                continue
            if interceptor is not None:
                forced[r] = list(interceptor(r, out.tokens[r]) or [])
            done[r] = not forced[r] and step[j] in stop_ids
        if all(done) or i == max_new_tokens - 1:
            break
        keep = [j for j, r in enumerate(active) if not done[r]]
        if len(keep) < len(active):  # finished rows leave the batch: the next steps compute only the others
            kept = torch.tensor(keep, device=device)
            cache.select(kept)
            keys, next_pos = keys[kept], next_pos[kept]
            active, step = [active[j] for j in keep], [step[j] for j in keep]
        token = torch.tensor(step, dtype=torch.long, device=device)[:, None]
        length = cache.length + 1
        logits = model(token, positions=next_pos[:, None], mask=keys[:, None, None, :length], cache=cache)[:, -1]
        next_pos = next_pos + 1
    out.truncated = [not d for d in done]
    model.train(was_training)
    return out
