"""`--profile N`: torch.profiler over N steps of a stage, after a warm-up, and where the step's time went.

The loop marks the parts of a step with `record_function` ranges (`glasslab/data`, `glasslab/forward`,
`glasslab/backward`, `glasslab/clip`, `glasslab/optimizer`, `glasslab/hook/<class>`, `glasslab/log`, and eval,
samples and checkpoint when they fall in the window). Inside the training forward, forward pre/post hooks on the
model's submodules, registered only for the profiled steps and never part of the model's code, mark
`glasslab/embedding` (`wte`), `glasslab/attention` (each `*.attn`) and `glasslab/mlp` (each `*.mlp`); the rest of
the forward (block norms and residual adds, the final norm, the head and the loss) is "head_and_loss". A compiled
forward is one fused graph: its submodules are not separated.

Writes profile/<stage>/trace.json (a Chrome trace) and profile/<stage>/summary.json: milliseconds per step and
share of the step for each part, and the ops with the most self time. The profiler's own bookkeeping slows every
op a little, so the profiled steps are slower than unprofiled ones; the shares are what to read.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch
from torch import nn
from torch.autograd.profiler import record_function

from glasslab.track.atomic import write_json_atomic
from glasslab.track.layout import PROFILE_SUMMARY, PROFILE_TRACE
from glasslab.track.rundir import RunDir

PREFIX = "glasslab/"
WARMUP = 3  # steps run before the profiled ones: first-step allocations, compilation, caches
MODULE_PARTS = ("embedding", "attention", "mlp")
TOP_OPS = 15


def module_part(name: str) -> str | None:
    """The part a submodule's forward counts as, by its name in the model, or None."""
    if name == "wte":
        return "embedding"
    if name.endswith(".attn"):
        return "attention"
    if name.endswith(".mlp"):
        return "mlp"
    return None


class StepProfiler:
    """Profiles steps [first, first + steps) of a stage (counted from the stage's first step in this session)
    and writes what it saw when the window closes. With steps = 0 every method is a no-op."""

    def __init__(
        self, run: RunDir | None, stage: str, model: nn.Module, steps: int, remaining: int, compiled: bool
    ) -> None:
        self.run, self.stage, self.model, self.compiled = run, stage, model, compiled
        self.steps = min(steps, remaining) if run is not None else 0
        self.first = min(WARMUP, remaining - self.steps)
        self.seen = 0  # steps started in this session
        self.profiled = 0
        self.step_ms = 0.0  # wall time of the profiled steps, from step_start to step_end
        self._t0 = 0.0
        self.active = False
        self.in_forward = False
        self.cuda = next(model.parameters()).device.type == "cuda"
        self._prof: torch.profiler.profile | None = None
        self._handles: list = []

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """A range of the step named `glasslab/<name>` while profiling; nothing otherwise."""
        if not self.active:
            yield
            return
        with record_function(PREFIX + name):
            yield
            if self.cuda:  # the range's kernels, not just their launches
                torch.cuda.synchronize()

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """The training forward (objective.loss): the only forward whose submodules are attributed."""
        with self.part("forward"):
            self.in_forward = True
            try:
                yield
            finally:
                self.in_forward = False

    def step_start(self) -> None:
        if self.steps and self.seen == self.first:
            self._start()
        self.seen += 1
        self._t0 = time.perf_counter()

    def step_end(self) -> None:
        if self.active:
            self.step_ms += (time.perf_counter() - self._t0) * 1e3
            self.profiled += 1
            if self.profiled == self.steps:
                self._stop()

    def close(self) -> None:
        """The stage ended inside the window (an error, a stop): write what was profiled."""
        if self.active:
            self._stop()

    def _start(self) -> None:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=acts, record_shapes=False)
        self._prof.start()
        self.active = True
        if not self.compiled:
            for name, module in self.model.named_modules():
                part = module_part(name)
                if part is not None:
                    self._handles += self._range_hooks(module, part)

    def _range_hooks(self, module: nn.Module, part: str) -> list:
        ranges: list[record_function] = []

        def pre(_m: nn.Module, _args: object) -> None:
            if self.in_forward:
                ranges.append(record_function(PREFIX + part))
                ranges[-1].__enter__()

        def post(_m: nn.Module, _args: object, _out: object) -> None:
            if self.in_forward and ranges:
                ranges.pop().__exit__(None, None, None)

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def _stop(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.active = False
        assert self._prof is not None and self.run is not None
        self._prof.stop()
        out = self.run.profile_dir(self.stage)
        out.mkdir(parents=True, exist_ok=True)
        self._prof.export_chrome_trace(str(out / PROFILE_TRACE))
        summary = summarize(self._prof, self.profiled, self.step_ms, self.stage, self.compiled)
        write_json_atomic(out / PROFILE_SUMMARY, summary)
        self.run.log_event(
            "profile",
            f"profiled {self.profiled} {self.stage} steps: {out / PROFILE_SUMMARY}, trace {out / PROFILE_TRACE}",
            stage=self.stage,
        )
        self._prof = None


def summarize(prof: torch.profiler.profile, steps: int, step_ms: float, stage: str, compiled: bool) -> dict:
    """Time by part (ms per step, share of the step) from the loop's ranges over `steps` steps that took `step_ms`
    in all, and the costliest ops by self time."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name.startswith(PREFIX):
            totals[event.name.removeprefix(PREFIX)] += event.time_range.elapsed_us() / 1e3
    step = step_ms
    modules = {p: totals.pop(p, 0.0) for p in MODULE_PARTS}
    parts = dict(totals)
    if any(modules.values()):
        forward = parts.pop("forward", 0.0)
        parts = {**modules, "head_and_loss": forward - sum(modules.values()), **parts}
    parts["other"] = max(step - sum(parts.values()), 0.0)  # the loop's own bookkeeping between the parts
    ops = [e for e in prof.key_averages() if not e.key.startswith(PREFIX)]
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "stage": stage,
        "steps": steps,
        "compiled": compiled,
        "step_ms": step / max(steps, 1),
        "parts": {
            name: {"ms_per_step": ms / max(steps, 1), "share": ms / step if step else 0.0}
            for name, ms in sorted(parts.items(), key=lambda kv: -kv[1])
        },
        "top_ops": [
            {
                "op": e.key,
                "self_ms_per_step": e.self_cpu_time_total / 1e3 / max(steps, 1),
                "calls_per_step": e.count / max(steps, 1),
            }
            for e in ops[:TOP_OPS]
        ],
    }
