"""Reward-hacking detectors: simple rules over windows of an RL run's step metrics that flag the classic ways a
policy games its reward instead of learning the task. A warning is an event in the run (kind "hacking",
with the detector's name) and a line in the terminal; it is a prompt to read the rollout tables, not a verdict.

Each rule compares `recent` (the median of the last `window` logged values of a metric) with `before` (the
`window` values before those) or with `start` (the first `window` values of the run). Medians, not means: one
outlying step (a single batch whose KL to the reference is 4.5 among steps at 0.3) is not a trend, and the
spike detector reports it as a spike already.

    format_over_correct  format reward recent - before >= +min_delta while correct reward recent - before <= -min_delta
    length_collapse      completion length recent < collapse_ratio x start
    length_cap           truncated ratio recent >= cap_ratio (most completions hit max_new_tokens)
    repetition           repeated 3-gram rate recent >= start + repeat_rise
    kl_runaway           KL to the reference recent >= kl_limit and still rising (recent > before)
    no_signal            share of groups whose rewards do not vary recent >= no_signal (nothing to learn from)

A detector fires when its rule becomes true, and again only after the rule has then stayed false for
`rearm` windows (3 by default): a lasting condition, even one that hovers around its threshold for hundreds of
steps, gives one warning, not one per crossing.
The history and the re-arming counts are saved with every checkpoint, so a resumed run warns exactly where the
uninterrupted one does.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence

from glasslab.train.loop import Hook, StepContext
from glasslab.ui import console


def repeat_rate(tokens: Sequence[int], n: int = 3) -> float:
    """Share of a sequence's n-grams that already occurred earlier in it: 0 for varied text, near 1 for a loop."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


WATCHED = (  # the metrics the rules read
    "rl/reward/format",
    "rl/reward/correct",
    "rl/completion_len_mean",
    "rl/truncated_ratio",
    "rl/repeat_rate",
    "rl/kl_ref",
    "rl/frac_reward_zero_std",
)


class HackingDetectors:
    """Feed it each step's metrics with `update`; it returns the warnings that step raised."""

    def __init__(
        self,
        window: int = 10,
        *,
        min_delta: float = 0.05,
        collapse_ratio: float = 0.5,
        cap_ratio: float = 0.5,
        repeat_rise: float = 0.2,
        kl_limit: float = 0.5,
        no_signal: float = 0.8,
        rearm: int = 3,
    ) -> None:
        self.rearm_steps = rearm * window
        self.window, self.min_delta, self.collapse_ratio, self.cap_ratio = window, min_delta, collapse_ratio, cap_ratio
        self.repeat_rise, self.kl_limit, self.no_signal = repeat_rise, kl_limit, no_signal
        self.history: dict[str, list[float]] = defaultdict(list)  # only the WATCHED metrics
        self.quiet: dict[str, int] = {}  # fired detectors -> steps their rule has been false since
        self.rules: dict[str, Callable[[], str | None]] = {
            "format_over_correct": self._format_over_correct,
            "length_collapse": self._length_collapse,
            "length_cap": self._length_cap,
            "repetition": self._repetition,
            "kl_runaway": self._kl_runaway,
            "no_signal": self._no_signal,
        }

    def update(self, metrics: dict[str, float]) -> list[tuple[str, str]]:
        """Record one step's metrics (missing ones are simply not recorded) and return (detector, message) for
        each rule that just became true."""
        for name in WATCHED:
            if name in metrics:
                self.history[name].append(float(metrics[name]))
        fired = []
        for name, rule in self.rules.items():
            message = rule()
            if message is not None and self.quiet.get(name, self.rearm_steps) >= self.rearm_steps:
                fired.append((name, message))
            if name in self.quiet or message is not None:
                self.quiet[name] = 0 if message is not None else self.quiet[name] + 1
        return fired

    def state_dict(self) -> dict:
        return {"history": dict(self.history), "quiet": dict(self.quiet)}

    def load_state_dict(self, state: dict) -> None:
        self.history = defaultdict(list, {k: list(v) for k, v in state["history"].items()})
        self.quiet = dict(state["quiet"])

    # windows over one metric's history; None until there is enough of it

    def _recent(self, name: str) -> float | None:
        h = self.history.get(name, [])
        return statistics.median(h[-self.window :]) if len(h) >= self.window else None

    def _before(self, name: str) -> float | None:
        h, w = self.history.get(name, []), self.window
        return statistics.median(h[-2 * w : -w]) if len(h) >= 2 * w else None

    def _start(self, name: str) -> float | None:
        h, w = self.history.get(name, []), self.window
        return statistics.median(h[:w]) if len(h) >= 2 * w else None  # only once recent no longer overlaps the start

    # the rules

    def _format_over_correct(self) -> str | None:
        f0, f1 = self._before("rl/reward/format"), self._recent("rl/reward/format")
        c0, c1 = self._before("rl/reward/correct"), self._recent("rl/reward/correct")
        if None in (f0, f1, c0, c1) or not (f1 - f0 >= self.min_delta and c1 - c0 <= -self.min_delta):
            return None
        return (
            f"format reward rose {f0:.3f} -> {f1:.3f} while correctness fell {c0:.3f} -> {c1:.3f}: the policy may be "
            "trading answers for format; check the rollout tables, or lower the format weight in rl.reward_weights"
        )

    def _length_collapse(self) -> str | None:
        start, recent = self._start("rl/completion_len_mean"), self._recent("rl/completion_len_mean")
        if start is None or recent is None or recent >= self.collapse_ratio * start:
            return None
        return (
            f"completion length collapsed from {start:.1f} to {recent:.1f} tokens: "
            "check the rollout tables for empty or stub answers"
        )

    def _length_cap(self) -> str | None:
        recent = self._recent("rl/truncated_ratio")
        if recent is None or recent < self.cap_ratio:
            return None
        return (
            f"{recent:.0%} of completions hit rl.max_new_tokens: answers are running on (rambling or looping); "
            "raise rl.max_new_tokens or keep rl.grpo.mask_truncated on"
        )

    def _repetition(self) -> str | None:
        start, recent = self._start("rl/repeat_rate"), self._recent("rl/repeat_rate")
        if start is None or recent is None or recent < start + self.repeat_rise:
            return None
        return (
            f"completions turned repetitive: repeated 3-gram rate {start:.2f} -> {recent:.2f}; check the rollout tables"
        )

    def _kl_runaway(self) -> str | None:
        before, recent = self._before("rl/kl_ref"), self._recent("rl/kl_ref")
        if before is None or recent is None or recent < self.kl_limit or recent <= before:
            return None
        return (
            f"KL to the reference is {recent:.3f} nats/token and rising (was {before:.3f}): the policy is drifting far "
            "from the SFT model; raise rl.grpo.beta (rl.dpo.beta with DPO) or lower rl.train.lr"
        )

    def _no_signal(self) -> str | None:
        recent = self._recent("rl/frac_reward_zero_std")
        if recent is None or recent < self.no_signal:
            return None
        return (
            f"{recent:.0%} of groups have rewards that do not vary (all right or all wrong), so they teach nothing: "
            "the task is too easy or too hard for the model; change the environment's difficulty or rl.group_size"
        )


class HackingHook(Hook):
    """Runs the detectors on every step's metrics as logged. It runs after every other hook (`order`), when
    the step's metrics are complete but for time and throughput, which no rule reads; its warnings are logged
    within the step, so the step's checkpoint holds the detectors' state after them."""

    order = 100

    def __init__(self, detectors: HackingDetectors) -> None:
        self.detectors = detectors

    def state_dict(self) -> dict:
        return self.detectors.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.detectors.load_state_dict(state)

    def on_optimizer_step(self, ctx: StepContext) -> None:
        for name, message in self.detectors.update(ctx.metrics):
            ctx.run.log_event("hacking", message, step=ctx.step, stage=ctx.stage, detector=name)
            console.print(f"[yellow]reward hacking? ({name}, step {ctx.step})[/] {message}", highlight=False)
