"""Tool use: multiplications too long for a tiny model to do in its head, answered through the calculator.

The ideal answer is a tool call, the tool's result and the final answer:

    <|assistant|><|tool_call|>123*456<|end|><|tool|>56088<|end|><|assistant|>56088<|end|>

so the model only has to learn *when* to call the tool and to copy its result; `glasslab.chat.tools.ToolInterceptor`
runs the call during generation. The system prompt tells these problems apart from plain arithmetic ones.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from glasslab.chat.format import TOOL_CALL, parse_completion
from glasslab.chat.tools import run_calculator
from glasslab.envs.arithmetic import Arithmetic, ArithmeticOptions
from glasslab.envs.base import Problem


class CalculatorOptions(ArithmeticOptions):
    ops: list[Literal["+", "-", "*"]] = Field(default=["*"], min_length=1)
    min_digits: int = Field(default=3, ge=1, le=9)
    max_digits: int = Field(default=3, ge=1, le=9)


class Calculator(Arithmetic):
    """Arithmetic problems (same options, other defaults) whose ideal answer goes through the tool."""

    name = "calculator"
    system_prompt = "Use the calculator."
    Options = CalculatorOptions

    def ideal_answer(self, problem: Problem) -> list[tuple[str, str]]:
        expr = problem.prompt.removesuffix("=")
        return [("assistant", TOOL_CALL + expr), ("tool", run_calculator(expr)), ("assistant", problem.answer)]

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        """correct: the final answer is the right number; format: the completion called the tool, then ended
        with a plain integer and <|end|>."""
        rewards = super().score(problem, completion)
        called = any(m.role == "tool" for m in parse_completion(completion))
        return rewards | {"format": rewards["format"] * called}
