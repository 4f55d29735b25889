"""Next-token prediction on a mixture of domains (`[data.mixture]`): training rows drawn by the scheduled weights,
validation on a fixed set of windows from every domain, its loss reported per domain and over all of them."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from glasslab.config import MixtureConfig
from glasslab.data.mixture import MixtureSampler
from glasslab.data.tokenizer import Tokenizer
from glasslab.data.tokens import TokenSplits, eval_batches
from glasslab.objectives.lm import LanguageModeling, score_windows

PROBE_ROWS = 8


class MixtureLanguageModeling(LanguageModeling):
    """LanguageModeling over domains. val/loss is the mean over domains (each domain's batches weigh the same,
    whatever the training weights), so it stays comparable across a shift; val/<domain>/loss and bpb beside it."""

    def __init__(
        self,
        splits: dict[str, TokenSplits],
        tokenizer: Tokenizer,
        *,
        mixture: MixtureConfig,
        batch_size: int,
        block_size: int,
        eval_batches_n: int,
        z_loss: float,
        seed: int,
        device: torch.device,
        total_steps: int,
        grad_accum: int = 1,
    ) -> None:
        self.tokenizer, self.device, self.z_loss, self.seed = tokenizer, device, z_loss, seed
        self.sample_prompt, self.sample_tokens = "\n", 128
        self.token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float64)  # for val/<domain>/bpb
        self.sampler = MixtureSampler(
            {d: s.train for d, s in splits.items()}, mixture, batch_size, block_size, seed, total_steps, grad_accum
        )
        self.domain_val = {d: eval_batches(s.val, batch_size, block_size, eval_batches_n) for d, s in splits.items()}
        self.val = [b for batches in self.domain_val.values() for b in batches]

    def val_domains(self) -> list[str]:
        """The domain of each of val_batches(), in order (for probes that break results down by domain)."""
        return [d for d, batches in self.domain_val.items() for _ in batches]

    def probe_inputs(self) -> Tensor:
        """The first rows of every domain's first validation batch, PROBE_ROWS in all: fixed, and every domain in."""
        per = math.ceil(PROBE_ROWS / len(self.domain_val))
        return torch.cat([b[0][0][:per] for b in self.domain_val.values()])[:PROBE_ROWS].to(self.device)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Per domain, val/<domain>/loss and bpb as LanguageModeling.evaluate defines them (objectives/lm.py)."""
        model.eval()
        out: dict[str, float] = {}
        for domain, batches in self.domain_val.items():
            out[f"val/{domain}/loss"], out[f"val/{domain}/bpb"] = score_windows(
                model, batches, self.token_bytes, self.device
            )
        loss = sum(out[f"val/{d}/loss"] for d in self.domain_val) / len(self.domain_val)
        return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), **out}
