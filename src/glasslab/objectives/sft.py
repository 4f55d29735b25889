"""Supervised fine-tuning on chat conversations: the loss covers assistant tokens only.

Conversations are right-padded to the longest in the batch; targets are -100 on padding and on every token
that is not trained (role headers, system, user and tool text), so padding never leaks into the loss and,
attention being causal, never into a real token's prediction either. The data order is a fresh
(coarsely length-bucketed) permutation per epoch drawn from (seed, rank, epoch), so the position alone
restores it exactly on resume (and under torchrun each rank draws its own batches).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glasslab.chat.format import Message, render, render_prompt
from glasslab.data.tokenizer import Tokenizer
from glasslab.envs.base import Environment, Split, split_of
from glasslab.errors import GlasslabError
from glasslab.objectives.lm import lm_loss
from glasslab.train.evaluate import complete, evaluate_env, prompt_tokens

BUCKET_BATCHES = 32  # batches per length-bucketing window


@dataclass(frozen=True)
class Example:
    ids: list[int]
    trained: list[bool]  # per token of ids: is it a target of the loss?


def to_example(messages: list[Message], tok: Tokenizer) -> Example:
    ids, trained = render(messages, tok)
    return Example(ids, trained)


def env_conversations(env: Environment, split: Split, n: int, seed: int | str) -> list[list[Message]]:
    """n conversations solving problems of one split (repeats allowed: a training set can outnumber the
    distinct problems), each the user's prompt followed by the environment's ideal answer."""
    rng, out = random.Random(seed), []
    for _ in range(1000 * max(n, 1)):
        if len(out) == n:
            return out
        p = env.sample_problem(rng)
        if split_of(p.prompt) == split:
            out.append(env.ideal_conversation(p))
    raise GlasslabError(f"{env.name}: could not draw {n} {split} problems: widen its settings")


def check_fits(examples: list[Example], max_tokens: int, source: str) -> None:
    longest = max((len(e.ids) for e in examples), default=0)
    if longest > max_tokens:
        raise GlasslabError(
            f"{source} makes conversations of up to {longest} tokens, more than the {max_tokens} that fit the "
            "context (model.block_size + 1): use smaller problems (its [envs] options) or a bigger block_size"
        )


def pad_batch(examples: list[Example], pad_id: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets, right-padded to the longest example; -100 where nothing is trained."""
    width = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), -100, dtype=torch.long)
    for r, e in enumerate(examples):
        ids, n = torch.tensor(e.ids), len(e.ids) - 1
        x[r, :n] = ids[:-1]
        y[r, :n] = ids[1:].masked_fill(~torch.tensor(e.trained[1:]), -100)
    return x, y


def fingerprint(examples: list[Example]) -> str:
    """Identifies the training set, so a resume on different data is refused instead of silently mixed."""
    return hashlib.sha256(json.dumps([e.ids for e in examples]).encode()).hexdigest()[:16]


class SupervisedFineTuning:
    """The SFT objective: batches of conversations, assistant-only loss; evaluation is the held-out loss
    plus greedy accuracy on each task environment."""

    stage = "sft"

    def __init__(
        self,
        train: list[Example],
        val: list[Example],
        tok: Tokenizer,
        *,
        envs: dict[str, Environment],
        batch_size: int,
        seed: int,
        device: torch.device,
        rank: int = 0,
        z_loss: float = 0.0,
        eval_n: int = 100,
        max_new_tokens: int = 32,
        sample_prompts: list[list[Message]] | None = None,
    ) -> None:
        if not train:
            raise GlasslabError("SFT has no training conversations: give sft.tasks or an sft.data file with some")
        self.train, self.val, self.tok, self.envs = train, val, tok, envs
        self.batch_size, self.seed, self.rank, self.device, self.z_loss = batch_size, seed, rank, device, z_loss
        self.eval_n, self.max_new_tokens, self.sample_prompts = eval_n, max_new_tokens, sample_prompts or []
        self.data_id = fingerprint(train)
        self.val_fixed = [pad_batch(val[i : i + batch_size], tok.pad_id) for i in range(0, len(val), batch_size)]
        self.position = 0  # examples consumed so far, across epochs
        self._epoch, self._order = -1, np.arange(0)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """A random permutation with coarse length bucketing: within windows of BUCKET_BATCHES batches, examples
        are grouped by length class (9-16 tokens, 17-32, 33-64, ...; a stable sort, so random within a class)
        and cut into batches, whose order is then shuffled. A mix of short arithmetic and long tool-use
        conversations thus pads little, while same-class examples stay randomly mixed: sorting by exact length
        would make batches of one difficulty and answer length, which slows learning several-fold."""
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        order, window, out = rng.permutation(len(self.train)), BUCKET_BATCHES * self.batch_size, []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda j: (len(self.train[j].ids) - 1).bit_length())
            batches = [chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
            out += [j for b in rng.permutation(len(batches)) for j in batches[b]]
        return np.array(out)

    def _example(self, position: int) -> Example:
        epoch, i = divmod(position, len(self.train))
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.epoch_order(epoch)
        return self.train[self._order[i]]

    def next_batch(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        batch = [self._example(self.position + i) for i in range(self.batch_size)]
        self.position += self.batch_size
        x, y = pad_batch(batch, self.tok.pad_id)
        return x.to(self.device), y.to(self.device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x, y = batch
        loss, parts = lm_loss(model(x), y, self.z_loss)
        parts["train/trained_tokens"] = float((y != -100).sum())
        return loss, parts

    def batch_tokens(self, batch: tuple[Tensor, Tensor]) -> int:
        return int((batch[0] != self.tok.pad_id).sum())

    # Optional methods for the probes (see the Objective protocol).

    def probe_inputs(self) -> Tensor:
        """Up to 8 fixed conversations (held-out ones if any), cut to the shortest so no row holds padding."""
        rows = (self.val or self.train)[:8]
        width = min(len(e.ids) for e in rows)
        return torch.tensor([e.ids[:width] for e in rows], device=self.device)

    def token_losses(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Per-token cross-entropy (B, T) in nats; NaN where nothing is trained (prompt, padding)."""
        x, y = (t.to(self.device) for t in batch)
        losses = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        return losses.masked_fill(y == -100, math.nan)

    def val_batches(self) -> list[tuple[Tensor, Tensor]]:
        return self.val_fixed

    def batch_ids(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return batch

    def batch_kind(self, batch: tuple[Tensor, Tensor]) -> str:
        """The batch's length class (`epoch_order`'s buckets): a bucket of tool-use conversations has twice the
        loss of one of arithmetic, with nothing wrong in the training."""
        n = batch[0].size(1).bit_length()
        return f"{1 << (n - 1)}-{(1 << n) - 1} tokens"

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        metrics: dict[str, float] = {}
        if self.val_fixed:
            total, count = 0.0, 0
            for x, y in self.val_fixed:
                logits = model(x.to(self.device))
                total += F.cross_entropy(logits.flatten(0, 1), y.to(self.device).flatten(), reduction="sum").item()
                count += int((y != -100).sum())
            metrics["val/loss"] = total / count  # per trained (assistant) token
        for task, env in self.envs.items() if self.eval_n else ():
            r = evaluate_env(
                model,
                self.tok,
                env,
                n=self.eval_n,
                seed=self.seed,
                samples=0,
                pass_k=(),
                max_new_tokens=self.max_new_tokens,
                task=task,
            )
            metrics.update(r.metrics())
        return metrics

    @torch.no_grad()
    def samples(self, model: nn.Module) -> list[dict]:
        """Greedy answers to a few held-out problems per task and to the first prompts of the data file."""
        records = []
        for task, env in self.envs.items():
            problems = env.problems("eval", 3, self.seed)
            texts = complete(
                model,
                self.tok,
                [prompt_tokens(env, p, self.tok) for p in problems],
                temperature=0.0,
                max_new_tokens=self.max_new_tokens,
                seed=self.seed,
                batch_size=len(problems),
            )
            records += [
                {"task": task, "prompt": p.prompt, "answer": p.answer, "completion": t, "rewards": env.score(p, t)}
                for p, t in zip(problems, texts)
            ]
        if self.sample_prompts:
            prompts = [render_prompt(m, self.tok) for m in self.sample_prompts]
            texts = complete(
                model,
                self.tok,
                prompts,
                temperature=0.0,
                max_new_tokens=self.max_new_tokens,
                seed=self.seed,
                batch_size=len(prompts),
            )
            records += [
                {"task": "data", "prompt": m[-1].content, "completion": t} for m, t in zip(self.sample_prompts, texts)
            ]
        return records

    def state_dict(self) -> dict:
        return {"position": self.position, "data": self.data_id}

    def load_state_dict(self, state: dict) -> None:
        if state["data"] != self.data_id:
            raise GlasslabError(
                "the SFT training data differ from the checkpoint's (tasks, options, examples or data file changed): "
                "resume with the run's own config and data, or start a new run"
            )
        self.position = state["position"]
