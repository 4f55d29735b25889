"""Beam search with length normalisation, on the same KV cache and tool `Interceptor` as `generate`.

Each step extends every beam by every token, keeps the `num_beams` best unfinished extensions by summed
log-probability, and records every extension by a stop token as a finished hypothesis. Hypotheses are ranked
by sum(log p) / length ** length_penalty, length counting the model's own tokens: 0 ranks by total
log-probability (short answers win), 1 by mean log-probability per token. The search runs to
`max_new_tokens` (with length normalisation a longer continuation can still overtake a finished one), and beams
still open then are ranked too, as truncated. Tokens an interceptor forces (a tool's result) extend their beam
as they are, add nothing to its score or its length, and keep a stop token that ends a tool call from ending it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from glasslab.model.generate import Interceptor
from glasslab.model.gpt import GPT, KVCache


@dataclass
class Hypothesis:
    tokens: list[int]  # completion tokens, stop token included when the hypothesis finished
    logprob: float  # sum of log p over the model's own tokens
    length: int  # how many of the tokens the model chose (forced ones excluded)
    truncated: bool = False

    def score(self, length_penalty: float) -> float:
        return self.logprob / max(self.length, 1) ** length_penalty


@dataclass
class _Beam:
    tokens: list[int]
    logprob: float
    length: int
    forced: list[int] = field(default_factory=list)


@torch.no_grad()
def beam_search(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    *,
    num_beams: int,
    length_penalty: float = 1.0,
    stop_ids: tuple[int, ...] = (),
    interceptor: Interceptor | None = None,
    n: int = 1,
) -> list[Hypothesis]:
    """The `n` best completions of `prompt` (n <= num_beams), best first."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cache = KVCache(model, 1, len(prompt) + max_new_tokens)
    logits = model(torch.tensor([prompt], device=device), cache=cache)[:, -1]
    beams = [_Beam([], 0.0, 0)]
    finished: list[Hypothesis] = []
    for step in range(max_new_tokens):
        logp = F.log_softmax(logits.float(), dim=-1).cpu()
        candidates: list[tuple[float, int, int, list[int]]] = []  # (summed log p, parent, token, forced after)
        for b, beam in enumerate(beams):
            if beam.forced:
                candidates.append((beam.logprob, b, beam.forced[0], beam.forced[1:]))
                continue
            for s in stop_ids:
                total = beam.logprob + float(logp[b, s])
                forced = list(interceptor(b, [*beam.tokens, s]) or []) if interceptor else []
                if forced:
                    candidates.append((total, b, s, forced))
                else:
                    finished.append(Hypothesis([*beam.tokens, s], total, beam.length + 1))
            row = logp[b].clone()
            row[list(stop_ids)] = float("-inf")
            top = torch.topk(row, min(num_beams, row.numel() - len(stop_ids)))
            for value, token in zip(top.values.tolist(), top.indices.tolist()):
                candidates.append((beam.logprob + value, b, token, []))
        candidates.sort(key=lambda c: -c[0])
        chosen, beams_next = candidates[:num_beams], []
        for total, b, token, forced in chosen:
            parent = beams[b]
            sampled = not parent.forced
            if sampled and not forced and interceptor is not None and token not in stop_ids:
                forced = list(interceptor(b, [*parent.tokens, token]) or [])
            beams_next.append(_Beam([*parent.tokens, token], total, parent.length + sampled, forced))
        beams = beams_next
        if not beams or step == max_new_tokens - 1:
            break
        cache.select(torch.tensor([c[1] for c in chosen], device=device))
        token = torch.tensor([[b.tokens[-1]] for b in beams], device=device)
        length = cache.length + 1
        keys = torch.ones(len(beams), 1, 1, length, dtype=torch.bool, device=device)
        positions = torch.full((len(beams), 1), length - 1, device=device)
        logits = model(token, positions=positions, mask=keys, cache=cache)[:, -1]
    finished += [Hypothesis(b.tokens, b.logprob, b.length, truncated=True) for b in beams]
    model.train(was_training)
    return sorted(finished, key=lambda h: -h.score(length_penalty))[:n]
