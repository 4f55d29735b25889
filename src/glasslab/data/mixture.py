"""Pretraining data from several named domains, mixed row by row with weights that a schedule changes over the
run (`[data.mixture]`): the way to put a distribution shift into pretraining, e.g. Shakespeare alone, then half
arithmetic text from step N. Every domain is tokenized into its own splits, so each row's domain is known and
validation loss is measured per domain."""

from __future__ import annotations

import random

import numpy as np
import torch

from glasslab.config import DataConfig, MixtureConfig
from glasslab.data.corpus import keep_chars, load_documents
from glasslab.data.tokens import _check_fits, _gather
from glasslab.errors import GlasslabError

SYNTHETIC_PREFIX = "synthetic:"


def arithmetic_documents(seed: int = 0, n_docs: int = 400, lines: int = 40) -> list[str]:
    """Text of worked sums, differences and products of 1- to 3-digit numbers, one per line: a domain whose
    statistics differ sharply from prose, made by the package itself."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        rows = []
        for _ in range(lines):
            a, b = rng.randint(0, 10 ** rng.randint(1, 3) - 1), rng.randint(0, 10 ** rng.randint(1, 3) - 1)
            op = rng.choice("+-*")
            rows.append(f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}")
        docs.append("\n".join(rows) + "\n")
    return docs


SYNTHETIC = {"arithmetic": arithmetic_documents}


def mixture_documents(cfg: DataConfig) -> dict[str, list[str]]:
    """The documents of every domain of `cfg.mixture`, each capped at data.max_chars, in the order of its sources."""
    out = {}
    for domain, source in cfg.mixture.sources.items():
        if source.startswith(SYNTHETIC_PREFIX):
            kind = source.removeprefix(SYNTHETIC_PREFIX)
            if kind not in SYNTHETIC:
                raise GlasslabError(
                    f"unknown generated source '{source}' for domain '{domain}': use one of "
                    + ", ".join(SYNTHETIC_PREFIX + k for k in SYNTHETIC)
                )
            docs = SYNTHETIC[kind]()
        else:
            docs = load_documents(source, cfg.text_field)
        out[domain] = keep_chars(docs, cfg.max_chars)
    return out


def weights_at(cfg: MixtureConfig, step: int, total_steps: int) -> np.ndarray:
    """The normalised domain shares in force at `step` (steps done) of `total_steps`, in the order of cfg.sources:
    the initial weights (a domain left out: 1), replaced by each schedule entry from its start on (a domain left
    out: 0). Entries apply in start order."""
    weights = {d: cfg.weights.get(d, 1.0) for d in cfg.sources}
    for entry in sorted(cfg.schedule, key=lambda e: e.start(total_steps)):
        if step >= entry.start(total_steps):
            weights = {d: entry.weights.get(d, 0.0) for d in cfg.sources}
    w = np.array(list(weights.values()), dtype=np.float64)
    return w / w.sum()


class MixtureSampler:
    """Random (x, y) training windows whose rows each come from a domain drawn with the current weights;
    reproducible from a seed and resumable mid-run like BatchSampler. The step that picks the weights is the
    number of batches drawn divided by grad_accum, of `total_steps` (train.steps, for schedule fractions)."""

    def __init__(
        self,
        tokens: dict[str, np.ndarray],
        cfg: MixtureConfig,
        batch_size: int,
        block_size: int,
        seed: int,
        total_steps: int,
        grad_accum: int = 1,
    ) -> None:
        for t in tokens.values():
            _check_fits(t, block_size)
        self.tokens, self.cfg = list(tokens.values()), cfg
        self.batch_size, self.block_size, self.grad_accum, self.seed = batch_size, block_size, grad_accum, seed
        self.total_steps = total_steps
        self.batches_drawn = 0
        self.rng = np.random.default_rng(seed)
        self._window = np.arange(block_size + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        shares = weights_at(self.cfg, self.batches_drawn // self.grad_accum, self.total_steps)
        domains = self.rng.choice(len(self.tokens), size=self.batch_size, p=shares)
        self.batches_drawn += 1
        rows = [
            _gather(self.tokens[d], self.rng.integers(0, len(self.tokens[d]) - self.block_size, size=1), self._window)
            for d in domains.tolist()
        ]
        return torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batches_drawn": self.batches_drawn, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.batches_drawn = state["batches_drawn"]
        self.rng.bit_generator.state = state["rng"]
