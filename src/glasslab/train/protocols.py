"""What a probe or hook may read beyond the `Objective` protocol, declared once.

An objective offers a capability by having the method; a hook asks with `isinstance(objective, TokenLosses)`
(runtime-checkable protocols check that the methods exist, not their signatures) and skips what it cannot
measure. The same goes for what a hook reads from a batch: the RL stage's hooks ask for `TimedBatch` and
`TabledBatch`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor, nn


@runtime_checkable
class ProbeRows(Protocol):
    """Fixed (B <= 8, T) token rows, the same every call, so attention and activation probes are comparable
    across steps and runs."""

    def probe_inputs(self) -> Tensor: ...


@runtime_checkable
class TokenLosses(Protocol):
    """The per-token loss (B, T) of a batch, NaN where a target is not trained on: the spike detector's worst
    tokens, and (with `ValBatches`) loss by position."""

    def token_losses(self, model: nn.Module, batch: Any) -> Tensor: ...


@runtime_checkable
class ValBatches(Protocol):
    """The fixed evaluation batches, the same at every evaluation (for loss by position)."""

    def val_batches(self) -> list: ...


@runtime_checkable
class PositionBatches(Protocol):
    """More fixed evaluation windows than the validation loss reads, for loss by position (pretraining)."""

    def position_batches(self, windows: int) -> list: ...


@runtime_checkable
class BatchIds(Protocol):
    """The (B, T) input and target token ids of a batch, to decode a spike's worst tokens."""

    def batch_ids(self, batch: Any) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class KindedBatches(Protocol):
    """The class of a batch, when batches differ systematically (SFT's length buckets): the spike detector
    compares like with like."""

    def batch_kind(self, batch: Any) -> str: ...


@runtime_checkable
class StaticShapes(Protocol):
    """`static_shapes` is True when every training batch has the same shape (pretraining's (B, block_size)
    windows), so a compiled forward compiles once: what `system.compile = "auto"` requires."""

    static_shapes: bool


@runtime_checkable
class TimedBatch(Protocol):
    """A batch that knows when it became ready to train on (`time.perf_counter()`), after sampling and scoring."""

    ready_at: float


@runtime_checkable
class TabledBatch(Protocol):
    """A batch whose rows can be written out as JSON-able records (the RL rollout tables)."""

    def records(self) -> list[dict]: ...
