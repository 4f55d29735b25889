"""The hooks of the RL stage: resetting the reference policy, the rollout tables, and the training share of a
step's time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from glasslab.track import layout
from glasslab.track.atomic import append_jsonl, write_bytes_atomic
from glasslab.track.rundir import RunDir
from glasslab.train.distributed import is_main
from glasslab.train.loop import Hook, StepContext
from glasslab.train.protocols import TabledBatch, TimedBatch


class HasReference(Protocol):
    """An RL objective whose reference policy can be reset (objectives/rollouts.py)."""

    ref: nn.Module

    def reset_reference(self, weights: dict[str, Tensor]) -> None: ...


class ReferenceReset(Hook):
    """Every `every` steps the reference policy becomes a copy of the current policy, so the KL penalty anchors
    to a recent policy instead of the SFT model (as in TRL's sync_ref_model). Each new reference is saved
    beside the checkpoints (checkpoints/rl/reference-step-N.safetensors); a resumed run loads the newest one
    not after its checkpoint, and before the first reset the reference is the SFT model it started from. Those
    files are its state, so it keeps none in the checkpoint."""

    every_rank = True  # every rank's reference must change together, or their KL terms differ

    def __init__(self, objective: HasReference, every: int, run: RunDir) -> None:
        self.objective, self.every, self.run = objective, every, run
        self.directory = run.stage_checkpoints_dir(layout.RL)

    def _saved(self) -> dict[int, Path]:
        files = self.directory.iterdir() if self.directory.is_dir() else ()
        return {step: f for f in files if (step := layout.step_of_reference(f)) is not None}

    def on_train_start(self, ctx: StepContext) -> None:
        saved = {s: f for s, f in self._saved().items() if s <= ctx.step}
        if saved:  # before any batch is drawn: the restored batch in flight was scored under this one
            self.objective.ref.load_state_dict(load_file(saved[max(saved)]))

    def on_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.step % self.every:
            return
        weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in ctx.model.state_dict().items()}
        self.objective.reset_reference(weights)
        if not is_main():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.run.reference_path(ctx.step), safetensors_bytes(weights))
        ctx.run.log_event(
            "notice", f"reference policy reset to the policy at step {ctx.step}", step=ctx.step, stage=ctx.stage
        )
        self._prune()

    def _prune(self) -> None:
        """Keep the references any remaining checkpoint can resume with: from the one in force at the oldest."""
        ckpts = [step for d in self.directory.iterdir() if (step := layout.step_of_checkpoint(d)) is not None]
        saved = self._saved()
        floor = max((s for s in saved if s <= min(ckpts, default=0)), default=None)
        for s, f in saved.items():
            if floor is not None and s < floor:
                f.unlink()


class RolloutTable(Hook):
    """Every `every` steps, the step's completions with their scores (and advantages, for GRPO) go to
    rollouts/step-N.jsonl: the raw material behind every reward curve. Batches that cannot list their rows
    (not a `TabledBatch`) are not tabled. No state across steps."""

    def __init__(self, run: RunDir, every: int) -> None:
        self.run, self.every = run, every

    def on_optimizer_step(self, ctx: StepContext) -> None:
        if not self.every or ctx.step % self.every or not isinstance(ctx.batch, TabledBatch):
            return
        path = self.run.rollout_path(ctx.step)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a resumed run writes the step again
        for record in ctx.batch.records():
            append_jsonl(path, {"step": ctx.step, **record})


class TrainingTime(Hook):
    """time/training_s: from a ready batch to the optimizer step done (policy forward, loss, backward, gradient
    probes, clipping, update), the part of an RL step that is not generation or reference scoring. It runs before
    every other hook (`order`), so their work is not in it; batches without a `ready_at` (not a `TimedBatch`)
    are not timed. No state across steps."""

    order = -20

    def on_optimizer_step(self, ctx: StepContext) -> None:
        if isinstance(ctx.batch, TimedBatch):
            ctx.metrics["time/training_s"] = time.perf_counter() - ctx.batch.ready_at
