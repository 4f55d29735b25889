"""Integer arithmetic: `12+45=` -> `57`. The first task a tiny model can learn, and a clean one to study: the
difficulty of a problem is the number of digits of its largest operand, so accuracy per level shows where
the model's arithmetic breaks down."""

from __future__ import annotations

import random
import re
from typing import Literal

from pydantic import Field, model_validator

from glasslab.envs.base import Environment, EnvOptions, Problem, final_answer

INTEGER = re.compile(r"-?\d+")


class ArithmeticOptions(EnvOptions):
    ops: list[Literal["+", "-", "*"]] = Field(default=["+", "-"], min_length=1)
    min_digits: int = Field(default=1, ge=1, le=9)
    max_digits: int = Field(default=2, ge=1, le=9)
    # Relative frequency of the difficulty levels: one weight per level, min_digits..max_digits, e.g. [1, 4, 1];
    # or by digit count, e.g. {3 = 0.1}, where levels not named weigh 1 and names outside the range are ignored,
    # so the table still holds when RL's env_options narrow the range. None: all levels equal.
    level_weights: list[float] | dict[int, float] | None = None
    negative: bool = False  # allow subtraction results below zero
    # Share of problems whose smaller operand gets fewer digits than the largest (1..digits-1, uniformly): the
    # operands' units digits then sit at varying distances from `=`, so the model must align them by the operator
    # rather than by position. 0: the smaller operand is uniform below 10**digits (mostly the same length).
    short_operand: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _levels(self) -> ArithmeticOptions:
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) must not exceed max_digits ({self.max_digits})")
        levels, w = self.max_digits - self.min_digits + 1, self.level_weights
        if isinstance(w, list) and len(w) != levels:
            raise ValueError(
                f"level_weights needs {levels} weights (one per digit count, {self.min_digits}..{self.max_digits}), "
                "or a table by digit count such as {3 = 0.1}"
            )
        if w is not None and (min(self.weights()) < 0 or not sum(self.weights())):
            raise ValueError("level_weights must be non-negative and not all zero over min_digits..max_digits")
        return self

    def levels(self) -> list[int]:
        return list(range(self.min_digits, self.max_digits + 1))

    def weights(self) -> list[float] | None:
        """The weight of each level in `levels()` (None: equal)."""
        w = self.level_weights
        return [w.get(d, 1.0) for d in self.levels()] if isinstance(w, dict) else w


def draw_operands(
    rng: random.Random, digits: int, op: str, negative: bool, short_operand: float = 0.0
) -> tuple[int, int]:
    """Two operands whose largest has exactly `digits` digits; the other has at most as many, and fewer with
    probability `short_operand` (drawn only when it is > 0, so the default problem stream does not change)."""
    low = 0 if digits == 1 else 10 ** (digits - 1)
    big = rng.randint(low, 10**digits - 1)
    short = digits > 1 and short_operand > 0 and rng.random() < short_operand
    other_digits = rng.randint(1, digits - 1) if short else digits
    other = rng.randint(0, 10**other_digits - 1)
    if op == "-" and not negative:
        return max(big, other), min(big, other)
    return (big, other) if rng.random() < 0.5 else (other, big)


def compute(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


class Arithmetic(Environment):
    name = "arithmetic"
    reward_names = ("correct", "digits", "format")
    Options = ArithmeticOptions

    def sample_problem(self, rng: random.Random) -> Problem:
        o = self.options
        digits = rng.choices(o.levels(), weights=o.weights())[0]
        op = rng.choice(o.ops)
        a, b = draw_operands(rng, digits, op, o.negative, o.short_operand)
        return Problem(f"{a}{op}{b}=", str(compute(a, op, b)), digits, {"a": a, "op": op, "b": b})

    def ideal_answer(self, problem: Problem) -> list[tuple[str, str]]:
        return [("assistant", problem.answer)]

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        """correct: the final answer is the right number; digits: partial credit, the share of its characters
        that match the right answer's, aligned at the units digit (a dense signal for RL: an answer with one
        wrong digit scores above one with three); format: it is a plain integer ending with <|end|>."""
        answer = final_answer(completion)
        well_formed = answer is not None and INTEGER.fullmatch(answer) is not None
        return {
            "correct": float(well_formed and int(answer) == int(problem.answer)),
            "digits": digit_match(answer, problem.answer) if well_formed else 0.0,
            "format": float(well_formed),
        }

    def diagnostics(self, problem: Problem, completion: str) -> dict[str, float]:
        """place/<units|tens|hundreds|...>: whether the answer's digit at that place (of its absolute value) is
        the right answer's, for each place the right answer has. It tells a carry error (tens wrong, units
        right) from an answer that misreads the operands (units wrong). A malformed answer is wrong at all."""
        answer, target = final_answer(completion), abs(int(problem.answer))
        value = abs(int(answer)) if answer is not None and INTEGER.fullmatch(answer) else None
        return {
            f"place/{place_name(k)}": float(value is not None and value // 10**k % 10 == target // 10**k % 10)
            for k in range(len(str(target)))
        }


PLACES = ("units", "tens", "hundreds", "thousands")


def place_name(k: int) -> str:
    """The name of the 10**k place: units, tens, hundreds, thousands, then 10^4, 10^5, ..."""
    return PLACES[k] if k < len(PLACES) else f"10^{k}"


def digit_match(answer: str, target: str) -> float:
    """Share of aligned positions (from the right, over the longer of the two) where answer and target agree."""
    width = max(len(answer), len(target))
    return sum(a == b for a, b in zip(answer.rjust(width), target.rjust(width))) / width
