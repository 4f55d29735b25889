"""The task-environment protocol, shared by SFT (to make data), evaluation, and RL (prompts and rewards).

An environment makes problems with a hidden reference answer, renders the ideal assistant answer for SFT,
and scores a completion with named reward functions. Train and eval problems never overlap: a problem
belongs to the eval split iff a hash of its prompt says so, whatever the seed.

Settings come from the config's `[envs.<name>]` table, validated by the environment's `Options` model
(see `glasslab.envs.get_env`), and are available as `self.options`.
"""

from __future__ import annotations

import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from glasslab.chat.format import END, TOOL_CALL, Message, parse_completion
from glasslab.errors import GlasslabError

Split = Literal["train", "eval"]


@dataclass(frozen=True)
class Problem:
    prompt: str  # the user's message
    answer: str  # the hidden reference
    difficulty: int  # e.g. for arithmetic: digits of the largest operand
    meta: dict = field(default_factory=dict, compare=False)


def split_of(prompt: str, eval_share: float = 0.2) -> Split:
    """Stable held-out assignment by content hash (independent of seed and of generation order)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_share else "train"


def final_answer(completion: str) -> str | None:
    """The assistant's final answer: the last turn's text, if the completion ended properly (with `<|end|>`,
    on an assistant turn that is not a tool call); None otherwise. Rewards build on this."""
    turns = parse_completion(completion)
    if (
        not completion.endswith(END)
        or not turns
        or turns[-1].role != "assistant"
        or turns[-1].content.startswith(TOOL_CALL)
    ):
        return None
    return turns[-1].content.strip()


class EnvOptions(BaseModel):
    """Base of every environment's settings: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class Environment(ABC):
    name: str
    reward_names: tuple[str, ...]  # e.g. ("correct", "format")
    system_prompt: str | None = None
    Options: ClassVar[type[EnvOptions]] = EnvOptions  # subclasses with settings override this

    def __init__(self, options: EnvOptions | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @abstractmethod
    def sample_problem(self, rng: random.Random) -> Problem:
        """One random problem (either split); `problems` filters by split."""

    def problems(self, split: Split, n: int, seed: int) -> list[Problem]:
        """n distinct problems of one split, fixed by seed."""
        rng, seen, out = random.Random(seed), set(), []
        for _ in range(200 * n):
            p = self.sample_problem(rng)
            if p.prompt not in seen and split_of(p.prompt) == split:
                seen.add(p.prompt)
                out.append(p)
                if len(out) == n:
                    return out
        raise GlasslabError(
            f"{self.name}: could not draw {n} distinct {split} problems: ask for fewer or widen its settings"
        )

    @abstractmethod
    def ideal_answer(self, problem: Problem) -> list[tuple[str, str]]:
        """The turns after the user's message that solve it, as (role, content): usually one assistant turn;
        with a tool, an assistant tool call, the tool's result, and the final assistant answer."""

    @abstractmethod
    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        """Reward per name in reward_names for a completion (the decoded assistant text, specials kept)."""

    def diagnostics(self, problem: Problem, completion: str) -> dict[str, float]:
        """Measurements of one answer besides its rewards, for evaluation only (arithmetic: which digit places
        are right). A name may be left out where it does not apply; evaluation averages each over the problems
        that report it."""
        return {}

    def prompt_messages(self, problem: Problem) -> list[Message]:
        """The system prompt (if any) and the problem as the user's message: what the model answers."""
        system = [Message("system", self.system_prompt)] if self.system_prompt else []
        return [*system, Message("user", problem.prompt)]

    def ideal_conversation(self, problem: Problem) -> list[Message]:
        """The prompt followed by the ideal answer: an SFT example, or a probe row."""
        return [*self.prompt_messages(problem), *(Message(role, text) for role, text in self.ideal_answer(problem))]

    def parts(self) -> list[Environment]:
        """The environments whose held-out accuracy is reported separately: this one (a mixture: its members)."""
        return [self]
