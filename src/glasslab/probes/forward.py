"""One extra no-grad forward of the objective's fixed probe rows, with hooks on the modules that matter.

Attention and activation probes share that forward when both are due. The hooks exist only for the
duration of the forward, so the training forward never carries them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from glasslab.data.tokenizer import SPECIAL_TOKENS
from glasslab.model.gpt import AttentionCore, Block
from glasslab.probes.activations import activation_stats, logit_stats
from glasslab.probes.attention import attention_probs, attention_stats
from glasslab.track.layout import (
    ACTIVATION_FAMILIES,
    ATTN_BOS,
    ATTN_ENTROPY,
    ATTN_ENTROPY_NORM,
    ATTN_MAX_LOGIT,
    metric,
)
from glasslab.train.loop import Hook, StepContext
from glasslab.train.protocols import ProbeRows

PAD_ID = SPECIAL_TOKENS.index("<|pad|>")  # special-token ids of every glasslab tokenizer (an imported one differs)
BOS_ID = SPECIAL_TOKENS.index("<|bos|>")

# attention_stats' statistics and the metric families they are logged as
ATTENTION_METRICS = {
    "entropy": ATTN_ENTROPY,
    "entropy_norm": ATTN_ENTROPY_NORM,
    "max_logit": ATTN_MAX_LOGIT,
    "bos": ATTN_BOS,
}


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[tuple[nn.Module, Callable[[nn.Module, tuple, Any], None]]]) -> Iterator[None]:
    """Register (module, fn) forward hooks for the duration of the block only; fn(module, args, output)."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for a measurement, then back to whatever mode the model was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def modules_of(model: nn.Module, kind: type, suffix: str = "") -> dict[str, nn.Module]:
    """Submodules of one type, keyed by their name without `suffix` (`blocks.2.attn.core` -> `blocks.2`)."""
    return {name.removesuffix(suffix): m for name, m in model.named_modules() if isinstance(m, kind)}


class ForwardProbe(Hook):
    """Attention (every `attention_every` steps) and activation/logit statistics (every `activations_every`)
    on `objective.probe_inputs()`, measured after the step's update and logged at that step. No state across
    steps: each measurement is of the model as it is."""

    def __init__(
        self, attention_every: int, activations_every: int, pad_id: int = PAD_ID, bos_id: int = BOS_ID
    ) -> None:
        self.attention_every, self.activations_every = attention_every, activations_every
        self.pad_id, self.bos_id = pad_id, bos_id

    def on_train_start(self, ctx: StepContext) -> None:
        self.enabled = isinstance(ctx.objective, ProbeRows)
        if not self.enabled and ctx.step == 0:  # once per stage, not again on resume
            ctx.run.log_event(
                "notice",
                f"attention and activation probes skipped: the {ctx.stage} objective has no probe_inputs()",
                step=ctx.step,
                stage=ctx.stage,
            )

    def on_optimizer_step(self, ctx: StepContext) -> None:
        attention = bool(self.attention_every) and ctx.step % self.attention_every == 0
        activations = bool(self.activations_every) and ctx.step % self.activations_every == 0
        if self.enabled and (attention or activations):
            inputs = ctx.objective.probe_inputs()
            ctx.metrics.update(probe_forward(ctx.model, inputs, attention, activations, self.pad_id, self.bos_id))


@torch.no_grad()
def probe_forward(
    model: nn.Module, inputs: Tensor, attention: bool, activations: bool, pad_id: int = PAD_ID, bos_id: int = BOS_ID
) -> dict[str, float]:
    """Run `inputs` through the model in eval mode and return the requested probe metrics. `pad_id` tokens in
    `inputs` are padding (probe rows are right-padded, so real queries never see them); attn_bos is the mass on
    `bos_id` tokens."""
    stats: dict[str, Tensor] = {}
    real, bos = inputs != pad_id, inputs == bos_id

    def on_attention(layer: str, module: nn.Module, args: tuple, output: Any) -> None:
        q, k, _, mask = args
        for kind, per_head in attention_stats(*attention_probs(q, k, mask), real, bos).items():
            family = ATTENTION_METRICS[kind]
            stats.update({metric(family, f"{layer}.h{h}"): v for h, v in enumerate(per_head)})
            stats[metric(family, layer)] = per_head.max() if family == ATTN_MAX_LOGIT else per_head.mean()

    def on_block(layer: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        for family, value in zip(ACTIVATION_FAMILIES, activation_stats(output)):
            stats[metric(family, layer)] = value

    hooks = []
    if attention:
        hooks += [
            (m, partial(on_attention, name)) for name, m in modules_of(model, AttentionCore, ".attn.core").items()
        ]
    if activations:
        hooks += [(m, partial(on_block, name)) for name, m in modules_of(model, Block).items()]
    with eval_mode(model), forward_hooks(hooks):
        logits = model(inputs)
    if activations:
        stats.update(logit_stats(logits))
    values = torch.stack(list(stats.values())).tolist() if stats else []
    return dict(zip(stats, values))
