"""Countdown: reach a target with given numbers, each used at most once: `Reach 22 with 3 5 7` -> `3*5+7`.

Many answers are right, so the ideal answer is just one of them and scoring evaluates the expression with the
safe calculator (never `eval`). A search task with a verifiable reward: the classic small-scale RL testbed.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Literal

from pydantic import Field, model_validator

from glasslab.chat.tools import CalcError, calculate, format_number, numbers_in
from glasslab.envs.base import Environment, EnvOptions, Problem, final_answer
from glasslab.errors import GlasslabError


class CountdownOptions(EnvOptions):
    min_numbers: int = Field(default=3, ge=2, le=6)
    max_numbers: int = Field(default=3, ge=2, le=6)
    max_number: int = Field(default=9, ge=2, le=100)  # numbers are drawn from 1..max_number
    max_target: int = Field(default=99, ge=1)
    ops: list[Literal["+", "-", "*"]] = Field(default=["+", "-", "*"], min_length=1)

    @model_validator(mode="after")
    def _range(self) -> CountdownOptions:
        if self.min_numbers > self.max_numbers:
            raise ValueError(f"min_numbers ({self.min_numbers}) must not exceed max_numbers ({self.max_numbers})")
        return self


class Countdown(Environment):
    name = "countdown"
    reward_names = ("correct", "format")
    Options = CountdownOptions

    def sample_problem(self, rng: random.Random) -> Problem:
        """Numbers and a random expression over all of them; its value, when a positive integer in range, is
        the target. Difficulty is how many numbers are given. Numbers are shown sorted, so the order of the
        ideal expression is not given away."""
        o = self.options
        for _ in range(1000):
            numbers = [rng.randint(1, o.max_number) for _ in range(rng.randint(o.min_numbers, o.max_numbers))]
            expr = str(numbers[0]) + "".join(rng.choice(o.ops) + str(n) for n in numbers[1:])
            target = calculate(expr)
            if 0 < target <= o.max_target:
                break
        else:
            raise GlasslabError(f"countdown: no target in 1..{o.max_target} found: raise envs.countdown.max_target")
        shown = sorted(numbers)
        prompt = f"Reach {format_number(target)} with {' '.join(map(str, shown))}"
        return Problem(prompt, expr, len(numbers), {"numbers": shown, "target": int(target)})

    def ideal_answer(self, problem: Problem) -> list[tuple[str, str]]:
        return [("assistant", problem.answer)]

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        """format: the final answer is an arithmetic expression ending with <|end|>; correct: it uses only the
        given numbers, each at most once, and equals the target."""
        answer = final_answer(completion)
        try:
            used, value = numbers_in(answer or ""), calculate(answer or "")
        except CalcError:
            return {"correct": 0.0, "format": 0.0}
        fair = not Counter(used) - Counter(problem.meta["numbers"])
        return {"correct": float(fair and value == problem.meta["target"]), "format": 1.0}
