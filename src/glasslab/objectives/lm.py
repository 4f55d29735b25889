"""Next-token prediction on a token stream: the pretraining objective."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glasslab.data.tokenizer import Tokenizer
from glasslab.data.tokens import BatchSampler, TokenSplits, eval_batches
from glasslab.model.generate import generate

PROBE_ROWS = 8  # fixed rows the attention and activation probes read


def lm_loss(
    logits: Tensor, targets: Tensor, z_loss: float = 0.0, ignore_index: int = -100
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy, plus z-loss (mean squared log-partition) when asked: it keeps output logits from drifting."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
    if not z_loss:
        return ce, {"train/loss": ce.item()}
    keep = targets.flatten() != ignore_index
    log_z = torch.logsumexp(logits.flatten(0, 1)[keep], dim=-1)
    z = log_z.square().mean()
    return ce + z_loss * z, {"train/loss": ce.item(), "train/z_loss": z.item()}


@torch.no_grad()
def score_windows(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], token_bytes: Tensor, device: torch.device
) -> tuple[float, float]:
    """(loss, bpb) of fixed (inputs, targets) windows. loss: mean nats over every target. bpb: the nats of the
    targets that are text, / ln 2, / the UTF-8 bytes of exactly those targets (`token_bytes`, from
    Tokenizer.token_bytes). Targets that are special tokens (a window's <|bos|> where a document starts) count 0
    bytes and are left out of both sums: bpb is the cost of the text alone, comparable across tokenizers and with
    byte- or char-level models."""
    nats = text_nats = n_bytes = 0.0
    for x, y in batches:
        losses = F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten(), reduction="none")
        losses = losses.double().cpu()
        counts = token_bytes[y.flatten()]
        nats += losses.sum().item()
        text_nats += losses[counts > 0].sum().item()
        n_bytes += counts.sum().item()
    return nats / sum(y.numel() for _, y in batches), text_nats / math.log(2) / n_bytes


class LanguageModeling:
    """Random windows of the training tokens; validation on a fixed set of windows so curves are comparable."""

    stage = "pretrain"
    static_shapes = True  # every batch is (batch_size, block_size): a compiled forward compiles once

    def __init__(
        self,
        splits: TokenSplits,
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        block_size: int,
        eval_batches_n: int,
        z_loss: float,
        seed: int,
        device: torch.device,
        sample_prompt: str = "\n",
        sample_tokens: int = 128,
    ) -> None:
        self.splits, self.tokenizer, self.device, self.z_loss = splits, tokenizer, device, z_loss
        self.sampler = BatchSampler(splits.train, batch_size, block_size, seed)
        self.val = eval_batches(splits.val, batch_size, block_size, eval_batches_n)
        self.sample_prompt, self.sample_tokens, self.seed = sample_prompt, sample_tokens, seed
        self._probe_rows: Tensor | None = None
        self._position: list[tuple[Tensor, Tensor]] | None = None
        self.token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.float64)  # for val/bpb

    def next_batch(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        x, y = self.sampler.next_batch()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, float]]:
        x, y = batch
        return lm_loss(model(x), y, self.z_loss)

    def batch_tokens(self, batch: tuple[Tensor, Tensor]) -> int:
        return batch[0].numel()

    # Optional methods for the probes (see the Objective protocol).

    def probe_inputs(self) -> Tensor:
        """8 fixed validation windows, so probe values compare across steps and runs. As many as the split allows
        start at a document's <|bos|> (spread evenly over the documents), so the attention mass on <|bos|> is
        measured where a model sees one in training; the other rows of the first validation batch fill the rest."""
        if self._probe_rows is None:
            block = self.val[0][0].size(1)
            starts = np.flatnonzero(np.asarray(self.splits.val) == self.tokenizer.bos_id)
            starts = starts[starts + block <= len(self.splits.val)]
            picked = np.unique(
                starts[np.linspace(0, len(starts) - 1, min(PROBE_ROWS, len(starts))).round().astype(int)]
            )
            rows = [torch.from_numpy(self.splits.val[s : s + block].astype(np.int64)) for s in picked]
            rows += [r for r in self.val[0][0] if not any(torch.equal(r, p) for p in rows)][: PROBE_ROWS - len(rows)]
            self._probe_rows = torch.stack(rows).to(self.device)
        return self._probe_rows

    def token_losses(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Per-token cross-entropy (B, T) in nats; NaN where the target is ignore_index (-100)."""
        x, y = (t.to(self.device) for t in batch)
        losses = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        return losses.masked_fill(y == -100, math.nan)

    def val_batches(self) -> list[tuple[Tensor, Tensor]]:
        return self.val

    def position_batches(self, windows: int) -> list[tuple[Tensor, Tensor]]:
        """At least `windows` fixed validation windows, evenly spaced (whole batches): loss by position reads more
        windows than val/loss, so its per-bucket intervals are narrow."""
        if self._position is None or len(self._position) * self.sampler.batch_size < windows:
            n_batches = math.ceil(windows / self.sampler.batch_size)
            self._position = eval_batches(self.splits.val, self.sampler.batch_size, self.sampler.block_size, n_batches)
        return self._position

    def batch_ids(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return batch

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        loss, bpb = score_windows(model, self.val, self.token_bytes, self.device)
        return {"val/loss": loss, "val/bpb": bpb, "val/ppl": math.exp(min(loss, 50.0))}

    def samples(self, model: nn.Module) -> list[dict]:
        prompt = [self.tokenizer.bos_id, *self.tokenizer.encode(self.sample_prompt)]
        out = generate(model, [prompt], self.sample_tokens, temperature=0.8, top_p=0.95, seed=self.seed)
        return [{"prompt": self.sample_prompt, "completion": self.tokenizer.decode(out.tokens[0])}]

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
