"""The one training loop. Every stage (pretrain, SFT, GRPO, DPO) is an `Objective` run through `train()`;
probes and other plug-ins are `Hook`s called at fixed points of each step, never inside the model.

A step: objective.next_batch -> objective.loss (+ MoE balancing losses) -> backward -> hooks.on_backward (raw gradients) -> clip ->
optimizer.step -> hooks.on_optimizer_step (the update just made) -> log. Evaluation, samples and checkpoints
happen between steps, so a checkpoint always holds a consistent state, hooks' state included, and a resumed run
repeats the uninterrupted run step for step: the same metrics and the same events.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from glasslab.budget import BudgetMeter
from glasslab.config import ModelConfig, SystemConfig, TrainConfig
from glasslab.errors import GlasslabError
from glasslab.model.moe import add_router_losses
from glasslab.track.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from glasslab.track.metrics import MetricStore
from glasslab.track.rundir import RunDir
from glasslab.train.compiling import compiled, should_compile
from glasslab.train.distributed import is_main, main_values, world_size, wrap
from glasslab.train.mfu import flops_per_token, peak_flops
from glasslab.train.optim import build_optimizer, set_lr
from glasslab.train.precision import autocast_dtype
from glasslab.train.profile import StepProfiler


class Objective(Protocol):
    """What makes a stage a stage: its data, its loss, its evaluation.

    Optional capabilities, used by the probes (glasslab.probes) and skipped when absent, are the protocols of
    glasslab.train.protocols: `ProbeRows` (probe_inputs), `TokenLosses` (token_losses), `ValBatches`
    (val_batches), `PositionBatches` (position_batches), `BatchIds` (batch_ids) and `KindedBatches` (batch_kind). A probe asks with isinstance.

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
    observe and write the run directory), except those with `every_rank`, which change what is trained.

    `order`: at every moment hooks run by ascending order (ties in the order they were given). By convention
      < 0   observers of the raw step: time taken, raw gradients in on_backward (before any hook that changes them)
      0     everything else: probes that add metrics, tables, the reference reset
      > 0   readers of the step's metrics (the reward-hacking detectors), which on_optimizer_step holds complete
            but for time and throughput once every lower hook has run

    State: a hook whose behaviour depends on earlier steps (rolling windows, detector history) returns that state
    from `state_dict` (JSON-able values and tensors, as in a checkpoint's extra state) and takes it back in
    `load_state_dict`. The loop saves it with every checkpoint, under `key` (default: the class name and its index
    among hooks of that class), and on resume calls `load_state_dict` right after `on_train_start`: on_train_start
    builds the fresh state, load_state_dict replaces it with the checkpoint's. A hook with no state of its own
    (everything derived from the model or the files at on_train_start) keeps the defaults.

    Ends: `on_train_end` when the stage reached its last step; `on_error` when the stage raised (the exception
    propagates after every hook saw it; a requested stop, `Interrupted`, is not an error); `close` whenever
    the stage ends, normally or not, for every hook whose on_train_start ran.
    """

    every_rank = False
    order = 0
    key: str | None = None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned; called after on_train_start when resuming."""

    def on_train_start(self, ctx: StepContext) -> None: ...

    def on_step_start(self, ctx: StepContext) -> None: ...

    def on_backward(self, ctx: StepContext) -> None: ...

    def on_optimizer_step(self, ctx: StepContext) -> None: ...

    def on_eval(self, ctx: StepContext) -> None: ...

    def on_train_end(self, ctx: StepContext) -> None: ...

    def on_nonfinite(self, ctx: StepContext) -> None:
        """The loss or gradient norm of this step is NaN/inf; the loop raises Diverged right after."""

    def on_error(self, ctx: StepContext, exc: BaseException) -> None:
        """The stage raised `exc` (Diverged, a failing hook or objective, Ctrl-C twice); it propagates after."""

    def close(self, ctx: StepContext) -> None:
        """The stage ended, however it ended: release what on_train_start acquired."""


def hook_keys(hooks: list[Hook]) -> list[str]:
    """Each hook's checkpoint key: its `key`, or its class name and index among the hooks of that class
    (`SpikeProbe.0`), which stays the same from run to resume as long as the same hooks are configured."""
    seen: dict[str, int] = {}
    keys = []
    for h in hooks:
        name = type(h).__name__
        keys.append(h.key or f"{name}.{seen.get(name, 0)}")
        seen[name] = seen.get(name, 0) + 1
    duplicates = {k for k in keys if keys.count(k) > 1}
    if duplicates:
        raise ValueError(f"hooks share checkpoint keys {sorted(duplicates)}: give each a distinct `key`")
    return keys


@contextlib.contextmanager
def running(hooks: list[Hook], ctx: StepContext, saved: dict[str, dict]) -> Iterator[None]:
    """on_train_start, then the checkpoint's `saved` hook states restored, then the body; on_error if it raises
    (except for a requested stop), and close in every case, for each hook that started."""
    started: list[Hook] = []
    try:
        for h, key in zip(hooks, hook_keys(hooks)):
            h.on_train_start(ctx)
            started.append(h)
            if key in saved:
                h.load_state_dict(saved[key])
        yield
    except Interrupted:
        raise
    except BaseException as exc:
        for h in started:
            h.on_error(ctx, exc)
        raise
    finally:
        for h in started:
            h.close(ctx)


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
    """Refuse a checkpoint whose model config differs; a key either side lacks (a checkpoint that predates it)
    counts as its default."""
    defaults = ModelConfig().model_dump()
    saved, current = {**defaults, **saved}, {**defaults, **current}
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
    """Run (or resume) one stage to cfg.steps, or until cfg.budget is spent. Returns the final step. When
    `system.compile` says so (glasslab.train.compiling), the objective's training forward runs through
    torch.compile, and under `system.precision` in bfloat16 autocast; evaluation, sampling and probes use the plain
    float32 module. Every step logs its model FLOPs per second and MFU (glasslab.train.mfu); `system.profile`
    profiles that many steps (glasslab.train.profile)."""
    system = system or SystemConfig()
    stage = objective.stage
    main = is_main()  # under torchrun, only rank 0 writes the run directory
    hooks = sorted(hooks, key=lambda h: h.order)
    if not main:
        hooks, progress = [h for h in hooks if h.every_rank], None
    device = next(model.parameters()).device
    device_type = device.type
    amp = autocast_dtype(system.precision, device_type)
    compile_ = should_compile(system.compile, objective, device_type, cfg.steps)
    forward = wrap(compiled(model) if compile_ else model)
    model_flops = flops_per_token(model)
    peak = peak_flops(device, amp or torch.float32)
    optimizer = build_optimizer(model, cfg)
    ctx = StepContext(stage, model, optimizer, objective, run, cfg)
    ckpt_root = run.checkpoints_dir
    budget = BudgetMeter(cfg.budget)
    resume_from = latest_checkpoint(ckpt_root, stage)
    hook_state: dict[str, dict] = {}
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        check_architecture(ckpt.extra["arch"], arch, resume_from)
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
        objective.load_state_dict(ckpt.extra["objective"])
        _set_rng_state(ckpt.rng)
        hook_state = ckpt.extra.get("hooks", {})  # checkpoints from before hooks kept state have none
        budget.load_state_dict(ckpt.extra.get("budget", {}))
        ctx.step = ckpt.step
    if main:  # what a killed run logged after its last checkpoint: the resumed run logs it again
        store.truncate_after(stage, ctx.step)
        run.truncate_logs_after(stage, ctx.step)

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
            extra={
                "arch": arch,
                "objective": objective.state_dict(),
                "hooks": {key: h.state_dict() for key, h in zip(hook_keys(hooks), hooks)},
                "budget": budget.state_dict(),
            },
            rng=_rng_state(),
            keep_last=cfg.keep_last,
        )

    if main:
        run.update_manifest(status="running", stage=stage, last_step=ctx.step)
    task = (
        progress.add_task(stage, total=cfg.steps, completed=ctx.step, loss=float("nan"), tps=0.0, mfu=0.0)
        if progress
        else None
    )
    profiler = StepProfiler(
        run if main else None, stage, model, system.profile, cfg.steps - ctx.step, compiled=compile_
    )
    part = profiler.part

    def call(moment: str) -> None:
        for h in hooks:
            with part(f"hook/{type(h).__name__}"):
                getattr(h, moment)(ctx)

    with StopRequested() as stop, running(hooks, ctx, hook_state), contextlib.closing(profiler):
        model.train()
        while ctx.step < cfg.steps and not budget.spent(ctx.step):
            profiler.step_start()
            t0 = time.perf_counter()
            ctx.metrics = {"optim/lr": set_lr(optimizer, ctx.step, cfg)}
            call("on_step_start")
            loss_sum, tokens, parts = 0.0, 0, {}
            for _ in range(cfg.grad_accum):
                with torch.autocast(device_type, dtype=amp, enabled=amp is not None):
                    with part("data"):
                        ctx.batch = objective.next_batch(model)
                    with profiler.forward():
                        loss, parts = add_router_losses(model, *objective.loss(forward, ctx.batch))
                with part("backward"):
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.item() / cfg.grad_accum
                tokens += objective.batch_tokens(ctx.batch)
            ctx.loss = loss_sum
            if not math.isfinite(loss_sum):
                for h in hooks:
                    h.on_nonfinite(ctx)
                raise Diverged(_diverged("loss", loss_sum, ctx.step + 1, ckpt_root, stage))
            call("on_backward")
            clip = cfg.grad_clip if cfg.grad_clip else float("inf")
            with part("clip"):
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            if not math.isfinite(grad_norm):
                for h in hooks:
                    h.on_nonfinite(ctx)
                raise Diverged(_diverged("gradient norm", grad_norm, ctx.step + 1, ckpt_root, stage))
            with part("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            ctx.step += 1
            ctx.metrics.update(parts)
            ctx.metrics.update({"optim/grad_norm": grad_norm, "optim/clipped": float(grad_norm > clip)})
            call("on_optimizer_step")
            dt = time.perf_counter() - t0
            flops_per_s = tokens * model_flops / dt  # this process's; MFU is per process against its own peak
            ctx.metrics.update(
                {
                    "throughput/tokens_per_s": tokens * world_size() / dt,
                    "throughput/model_flops_per_s": flops_per_s * world_size(),
                    "throughput/mfu": flops_per_s / peak,
                    "time/step_s": dt,
                }
            )
            with part("log"):
                if main:
                    store.log(ctx.step, stage, ctx.metrics)
                if progress:
                    progress.update(task, completed=ctx.step, loss=loss_sum, tps=tokens / dt, mfu=flops_per_s / peak)
            spent = (tokens * world_size(), time.perf_counter() - t0)
            budget.add(*(main_values(*spent) if budget.measured else spent))  # every rank stops at rank 0's count
            last = ctx.step == cfg.steps or budget.spent(ctx.step)
            if (cfg.eval_every and ctx.step % cfg.eval_every == 0) or last:
                with part("eval"):
                    ctx.metrics = objective.evaluate(model)
                    call("on_eval")
                    if main:
                        store.log(ctx.step, stage, ctx.metrics)
                    model.train()
            if main and ((cfg.sample_every and ctx.step % cfg.sample_every == 0) or last):
                with part("samples"):
                    for record in objective.samples(model):
                        run.log_sample({"stage": stage, "step": ctx.step, **record})
                    model.train()
            if ctx.step % cfg.checkpoint_every == 0 or last or stop.requested:
                with part("checkpoint"):
                    checkpoint()
                    if main:
                        run.update_manifest(last_step=ctx.step)
            profiler.step_end()
            if stop.requested and not last:
                raise Interrupted(f"stopped at step {ctx.step} of {stage}")
        for h in hooks:
            h.on_train_end(ctx)
    return ctx.step


def _diverged(what: str, value: float, step: int, ckpt_root: Path, stage: str) -> str:
    good = latest_checkpoint(ckpt_root, stage)
    where = f"last good checkpoint: {good}" if good else "no checkpoint was written yet"
    return f"{what} became {value} at step {step} of {stage} ({where}): lower train.lr or set train.grad_clip"
