"""The one training loop. Every stage (pretrain, SFT, GRPO, DPO) is an `Objective` run through `train()`;
probes and other plug-ins are `Hook`s called at fixed points of each step, never inside the model.

A step: objective.next_batch -> objective.loss -> backward -> hooks.on_backward (raw gradients) -> clip ->
optimizer.step -> hooks.on_optimizer_step (the update just made) -> log. Evaluation, samples and checkpoints
happen between steps, so a checkpoint always holds a consistent state and a resumed run repeats the
uninterrupted run step for step.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from glasslab.config import SystemConfig, TrainConfig
from glasslab.errors import GlasslabError
from glasslab.track.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from glasslab.track.metrics import MetricStore
from glasslab.track.rundir import RunDir
from glasslab.train.budget import BudgetMeter
from glasslab.train.distributed import is_main, main_values, world_size, wrap
from glasslab.train.optim import build_optimizer, set_lr
from glasslab.train.precision import autocast_dtype


class Objective(Protocol):
    """What makes a stage a stage: its data, its loss, its evaluation.

    Optional methods, used by the probes (glasslab.probes) and skipped gracefully when absent:
      probe_inputs() -> Tensor               fixed (B <= 8, T) token rows, the same every call, so attention and
                                             activation probes are comparable across steps and runs
      token_losses(model, batch) -> Tensor   per-token loss (B, T) of a batch, NaN where a target is not trained on
      val_batches() -> list                  the fixed evaluation batches (for loss by position)
      position_batches(windows) -> list      more fixed evaluation windows for loss by position, when cheap
      batch_ids(batch) -> (inputs, targets)  the (B, T) token ids of a batch, to decode a spike's worst tokens
      batch_kind(batch) -> str               the class of a batch, when batches differ systematically (SFT's length
                                             buckets): the spike detector compares like with like

    A step (next_batch and loss) runs under the precision of `system.precision`, so every log-prob an objective
    compares (policy, reference, old policy) comes from the same arithmetic; sampling runs in float32 regardless.
    """

    stage: str

    def next_batch(self, model: nn.Module) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]: ...

    def batch_tokens(self, batch: Any) -> int: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def samples(self, model: nn.Module) -> list[dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class StepContext:
    """What hooks see. `metrics` is filled by everyone during a step and logged once at its end."""

    stage: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    objective: Objective
    run: RunDir
    cfg: TrainConfig
    step: int = 0
    batch: Any = None
    loss: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)


class Hook:
    """A plug-in called by the loop; override the moments you need. Under torchrun only rank 0 runs hooks (they
    observe and write the run directory), except those with `every_rank`, which change what is trained."""

    every_rank = False

    def on_train_start(self, ctx: StepContext) -> None: ...

    def on_step_start(self, ctx: StepContext) -> None: ...

    def on_backward(self, ctx: StepContext) -> None: ...

    def on_optimizer_step(self, ctx: StepContext) -> None: ...

    def on_eval(self, ctx: StepContext) -> None: ...

    def on_train_end(self, ctx: StepContext) -> None: ...

    def on_nonfinite(self, ctx: StepContext) -> None:
        """The loss or gradient norm of this step is NaN/inf; the loop raises Diverged right after."""


class Diverged(GlasslabError):
    """Loss or gradient became NaN/inf."""


class StopRequested:
    """Turns Ctrl-C / SIGTERM into a flag read between steps, so the loop can checkpoint a consistent state."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    """Raised after the loop saved a checkpoint because a stop was requested."""


def _rng_state() -> dict[str, Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def check_architecture(saved: dict, current: dict, path: Path) -> None:
    diff = [
        f"{k}: {saved.get(k)!r} vs {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diff:
        raise GlasslabError(
            f"checkpoint {path} is from another architecture ({'; '.join(diff)}): "
            "resume with the run's own config, or start a new run"
        )


def train(
    model: nn.Module,
    objective: Objective,
    cfg: TrainConfig,
    run: RunDir,
    store: MetricStore,
    *,
    arch: dict,
    hooks: list[Hook] = (),  # type: ignore[assignment]
    progress: Any = None,
    system: SystemConfig | None = None,
) -> int:
    """Run (or resume) one stage to cfg.steps, or until cfg.budget is spent. Returns the final step. With
    `system.compile`, the objective's training forward runs through torch.compile, and under `system.precision` in
    bfloat16 autocast; evaluation, sampling and probes use the plain float32 module."""
    system = system or SystemConfig()
    stage = objective.stage
    main = is_main()  # under torchrun, only rank 0 writes the run directory
    if not main:
        hooks, progress = [h for h in hooks if h.every_rank], None
    forward = wrap(torch.compile(model) if system.compile else model)
    device_type = next(model.parameters()).device.type
    amp = autocast_dtype(system.precision, device_type)
    optimizer = build_optimizer(model, cfg)
    ctx = StepContext(stage, model, optimizer, objective, run, cfg)
    ckpt_root = run.checkpoints_dir
    budget = BudgetMeter(cfg.budget)
    resume_from = latest_checkpoint(ckpt_root, stage)
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        check_architecture(ckpt.extra["arch"], arch, resume_from)
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
        objective.load_state_dict(ckpt.extra["objective"])
        _set_rng_state(ckpt.rng)
        budget.load_state_dict(ckpt.extra.get("budget", {}))
        ctx.step = ckpt.step
    if main:
        store.truncate_after(stage, ctx.step)  # rows a killed run logged after its last checkpoint

    def checkpoint() -> None:
        if not main:
            return
        store.flush()  # metrics up to a checkpoint are as durable as the checkpoint
        save_checkpoint(
            ckpt_root,
            stage,
            ctx.step,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            extra={"arch": arch, "objective": objective.state_dict(), "budget": budget.state_dict()},
            rng=_rng_state(),
            keep_last=cfg.keep_last,
        )

    if main:
        run.update_manifest(status="running", stage=stage, last_step=ctx.step)
    task = (
        progress.add_task(stage, total=cfg.steps, completed=ctx.step, loss=float("nan"), tps=0.0) if progress else None
    )
    for h in hooks:
        h.on_train_start(ctx)
    model.train()
    with StopRequested() as stop:
        while ctx.step < cfg.steps and not budget.spent(ctx.step):
            t0 = time.perf_counter()
            ctx.metrics = {"optim/lr": set_lr(optimizer, ctx.step, cfg)}
            for h in hooks:
                h.on_step_start(ctx)
            loss_sum, tokens, parts = 0.0, 0, {}
            for _ in range(cfg.grad_accum):
                with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
                    ctx.batch = objective.next_batch(model)
                    loss, parts = objective.loss(forward, ctx.batch)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
                tokens += objective.batch_tokens(ctx.batch)
            ctx.loss = loss_sum
            if not math.isfinite(loss_sum):
                for h in hooks:
                    h.on_nonfinite(ctx)
                raise Diverged(_diverged("loss", loss_sum, ctx.step + 1, ckpt_root, stage))
            for h in hooks:
                h.on_backward(ctx)
            clip = cfg.grad_clip if cfg.grad_clip else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            if not math.isfinite(grad_norm):
                for h in hooks:
                    h.on_nonfinite(ctx)
                raise Diverged(_diverged("gradient norm", grad_norm, ctx.step + 1, ckpt_root, stage))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ctx.step += 1
            for h in hooks:
                h.on_optimizer_step(ctx)
            dt = time.perf_counter() - t0
            ctx.metrics.update(parts)
            ctx.metrics.update(
                {
                    "optim/grad_norm": grad_norm,
                    "optim/clipped": float(grad_norm > clip),
                    "throughput/tokens_per_s": tokens * world_size() / dt,
                    "time/step_s": dt,
                }
            )
            if main:
                store.log(ctx.step, stage, ctx.metrics)
            spent = (tokens * world_size(), time.perf_counter() - t0)
            budget.add(*(main_values(*spent) if budget.measured else spent))  # every rank stops at rank 0's count
            last = ctx.step == cfg.steps or budget.spent(ctx.step)
            if (cfg.eval_every and ctx.step % cfg.eval_every == 0) or last:
                ctx.metrics = objective.evaluate(model)
                for h in hooks:
                    h.on_eval(ctx)
                if main:
                    store.log(ctx.step, stage, ctx.metrics)
                model.train()
            if main and ((cfg.sample_every and ctx.step % cfg.sample_every == 0) or last):
                for record in objective.samples(model):
                    run.log_sample({"stage": stage, "step": ctx.step, **record})
                model.train()
            if ctx.step % cfg.checkpoint_every == 0 or last or stop.requested:
                checkpoint()
                if main:
                    run.update_manifest(last_step=ctx.step)
            if progress:
                progress.update(task, completed=ctx.step, loss=loss_sum, tps=tokens / dt)
            if stop.requested and not last:
                raise Interrupted(f"stopped at step {ctx.step} of {stage}")
    for h in hooks:
        h.on_train_end(ctx)
    return ctx.step


def _diverged(what: str, value: float, step: int, ckpt_root: Path, stage: str) -> str:
    good = latest_checkpoint(ckpt_root, stage)
    where = f"last good checkpoint: {good}" if good else "no checkpoint was written yet"
    return f"{what} became {value} at step {step} of {stage} ({where}): lower train.lr or set train.grad_clip"
