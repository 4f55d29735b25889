"""A stage's budget: a number of optimizer steps, of tokens trained on, or of wall-clock seconds.

The loop stops after the step that crosses the budget (or at `train.steps`, whichever comes first) and then
runs the stage's final evaluation, on the same fixed evaluation set as ever. The learning-rate schedule stays
defined over `train.steps`, so two arms stopped by the same budget follow the same schedule.

Steps and tokens are exact, also across a resume: the tokens and seconds spent are saved in each checkpoint.
Seconds count the training steps' wall-clock time (evaluations and checkpoints between steps are left out, so an
arm is not charged for how often it evaluates). They are not reproducible: they depend on the machine and on its load, so a comparison under a seconds budget
must run its arms interleaved, at the same time, and never reuse a run made at another time.

Written as `2000steps`, `1e6tokens`, `90s`, `1.5min` (torch-free, so the config and the CLI parse it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Unit = Literal["steps", "tokens", "seconds"]
_UNITS: dict[str, tuple[Unit, float]] = {
    "steps": ("steps", 1),
    "step": ("steps", 1),
    "tokens": ("tokens", 1),
    "tok": ("tokens", 1),
    "s": ("seconds", 1),
    "sec": ("seconds", 1),
    "seconds": ("seconds", 1),
    "min": ("seconds", 60),
    "h": ("seconds", 3600),
}
_FORM = re.compile(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)\s*([a-z]+)\s*")
EXAMPLES = "2000steps, 1e6tokens, 90s or 2min"


@dataclass(frozen=True)
class Budget:
    unit: Unit
    amount: float

    def __str__(self) -> str:
        value = int(self.amount) if self.amount == int(self.amount) else self.amount
        return f"{value}{'s' if self.unit == 'seconds' else self.unit}"


def parse_budget(text: str) -> Budget:
    """`60s` -> Budget("seconds", 60). Raises ValueError (the config turns it into a one-line error)."""
    m = _FORM.fullmatch(str(text).lower())
    if not m or m[2] not in _UNITS:
        raise ValueError(f"budget '{text}' is not a number with a unit: write it like {EXAMPLES}")
    unit, scale = _UNITS[m[2]]
    amount = float(m[1].replace("_", "")) * scale
    if amount <= 0 or (unit != "seconds" and amount != int(amount)):
        raise ValueError(f"budget '{text}' must be positive (whole steps or tokens): write it like {EXAMPLES}")
    return Budget(unit, amount)


class BudgetMeter:
    """What a stage has spent so far; `state_dict` goes into each checkpoint so a resumed stage stops exactly
    where the uninterrupted one would (seconds excepted: a resumed run's seconds are those it actually spent)."""

    def __init__(self, budget: str | None) -> None:
        self.budget = parse_budget(budget) if budget else None
        self.tokens = 0
        self.seconds = 0.0

    @property
    def measured(self) -> bool:
        """Counted from what each step did (tokens, seconds), not from the step number."""
        return self.budget is not None and self.budget.unit != "steps"

    def add(self, tokens: float, seconds: float) -> None:
        self.tokens += int(tokens)
        self.seconds += seconds

    def spent(self, step: int) -> bool:
        """True once the budget is crossed (never without a budget)."""
        if self.budget is None:
            return False
        used = {"steps": step, "tokens": self.tokens, "seconds": self.seconds}[self.budget.unit]
        return used >= self.budget.amount

    def state_dict(self) -> dict[str, float]:
        return {"tokens": self.tokens, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.tokens = int(state.get("tokens", 0))
        self.seconds = float(state.get("seconds", 0.0))
