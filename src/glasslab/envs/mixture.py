"""Several environments as one, for RL on a mix of tasks: `[rl] env = { countdown = 3, arithmetic = 1 }`.

Training on one task wears down the others (GRPO on countdown alone lowers 2-digit arithmetic: docs/RESULTS.md).
Mixing in a task the model already solves keeps it under the reward: its groups carry no signal while every
answer is right, and a signal again as soon as the policy starts to get some wrong.
"""

from __future__ import annotations

import random
from dataclasses import replace

from glasslab.chat.format import Message
from glasslab.envs.base import Environment, Problem


class Mixture(Environment):
    """Each problem comes from a member drawn by weight and remembers it (`meta["env"]`): its prompt, ideal
    answer and scores are that member's. The reward functions are the union of the members'; a member scores
    0 on one it does not have. Evaluation reports each member separately (`parts`)."""

    def __init__(self, members: dict[str, Environment], weights: dict[str, float]) -> None:
        super().__init__()
        self.members, self.weights = members, [weights[name] for name in members]
        self.name = "+".join(members)
        self.reward_names = tuple(dict.fromkeys(r for env in members.values() for r in env.reward_names))

    def member(self, problem: Problem) -> Environment:
        return self.members[problem.meta["env"]]

    def sample_problem(self, rng: random.Random) -> Problem:
        name = rng.choices(list(self.members), weights=self.weights)[0]
        problem = self.members[name].sample_problem(rng)
        return replace(problem, meta={**problem.meta, "env": name})

    def ideal_answer(self, problem: Problem) -> list[tuple[str, str]]:
        return self.member(problem).ideal_answer(problem)

    def prompt_messages(self, problem: Problem) -> list[Message]:
        return self.member(problem).prompt_messages(problem)

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        scores = self.member(problem).score(problem, completion)
        return {name: scores.get(name, 0.0) for name in self.reward_names}

    def parts(self) -> list[Environment]:
        return list(self.members.values())
