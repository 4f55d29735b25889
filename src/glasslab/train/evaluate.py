"""Evaluation on a task environment: greedy accuracy, pass@k from sampled answers, and the breakdown by
difficulty, by reward function and by the environment's diagnostics, on a held-out problem set fixed by the seed.

Generation is batched (every problem of a batch at once) and goes through the tool interceptor, so a model
that calls the calculator is evaluated with the tool working, exactly as in chat and RL.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from math import comb

from torch import nn

from glasslab.chat.format import render_prompt
from glasslab.data.tokenizer import Tokenizer
from glasslab.envs.base import Environment, Problem, Split
from glasslab.errors import GlasslabError
from glasslab.model.beam import beam_search
from glasslab.model.generate import generate


@dataclass
class EvalResult:
    task: str
    n: int
    seed: int
    accuracy: float  # greedy, from the `correct` reward
    pass_at_k: dict[int, float] = field(default_factory=dict)
    by_difficulty: dict[int, float] = field(default_factory=dict)  # greedy accuracy per level
    rewards: dict[str, float] = field(default_factory=dict)  # greedy mean per reward function
    diagnostics: dict[str, float] = field(default_factory=dict)  # greedy mean of each, over the problems reporting it
    records: list[dict] = field(default_factory=list)  # one per problem: prompt, answer, completion, rewards, ...

    def as_dict(self) -> dict:
        return {
            "task": self.task,
            "n": self.n,
            "seed": self.seed,
            "accuracy": self.accuracy,
            "pass_at_k": self.pass_at_k,
            "by_difficulty": self.by_difficulty,
            "rewards": self.rewards,
            "diagnostics": self.diagnostics,
        }

    def metrics(self) -> dict[str, float]:
        """As metrics: eval/<task>/accuracy, /pass@k, /<reward> (besides correct), /<diagnostic>,
        /by_difficulty/<level>."""
        out = {f"eval/{self.task}/accuracy": self.accuracy}
        out |= {f"eval/{self.task}/pass@{k}": v for k, v in self.pass_at_k.items()}
        out |= {f"eval/{self.task}/{name}": v for name, v in self.rewards.items() if name != "correct"}
        out |= {f"eval/{self.task}/{name}": v for name, v in self.diagnostics.items()}
        return out | {f"eval/{self.task}/by_difficulty/{d}": v for d, v in self.by_difficulty.items()}


def prompt_tokens(env: Environment, problem: Problem, tok: Tokenizer) -> list[int]:
    """The environment's system prompt (if any) and the problem as the user's message, ready for the answer."""
    return render_prompt(env.prompt_messages(problem), tok)


def completion_text(tok: Tokenizer, tokens: list[int]) -> str:
    """The generated assistant completion as glasslab's chat-format text, special tokens kept (rewards read
    `<|end|>`, tool calls), whatever format the model was prompted in."""
    return tok.chat.completion_text(tokens)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k draws is correct) from n samples with c correct
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code")."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def complete(
    model: nn.Module,
    tok: Tokenizer,
    prompts: list[list[int]],
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int = 1,
) -> list[str]:
    """Completions of many prompts, `batch_size` at a time, with the calculator tool available; with
    `num_beams` > 1, each prompt's best beam instead (beam search is deterministic: temperature is not used)."""
    interceptor = tok.chat.interceptor()
    if num_beams > 1:
        return [
            completion_text(
                tok,
                beam_search(
                    model, p, max_new_tokens, num_beams=num_beams, stop_ids=(tok.end_id,), interceptor=interceptor
                )[0].tokens,
            )
            for p in prompts
        ]
    texts = []
    for i in range(0, len(prompts), batch_size):
        out = generate(
            model,
            prompts[i : i + batch_size],
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_ids=(tok.end_id,),
            pad_id=tok.pad_id,
            seed=seed + i,
            interceptor=interceptor,
        )
        texts += [completion_text(tok, t) for t in out.tokens]
    return texts


def evaluate_env(
    model: nn.Module,
    tok: Tokenizer,
    env: Environment,
    *,
    n: int,
    seed: int,
    pass_k: tuple[int, ...] | list[int] = (1, 4),
    samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    split: Split = "eval",
    batch_size: int = 64,
    task: str | None = None,
    num_beams: int = 1,
) -> EvalResult:
    """Greedy answers (or each problem's best of `num_beams` beams) give accuracy, per-difficulty accuracy and
    mean rewards; `samples` answers per problem at `temperature` give pass@k for each k in `pass_k` (none when
    samples is 0)."""
    if samples and any(k < 1 or k > samples for k in pass_k):
        raise GlasslabError(
            f"pass@k needs 1 <= k <= samples ({samples}), got k = {list(pass_k)}: raise --samples or lower --k"
        )
    problems = env.problems(split, n, seed)
    prompts = [prompt_tokens(env, p, tok) for p in problems]
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size)
    greedy = complete(model, tok, prompts, temperature=0.0, seed=seed, num_beams=num_beams, **kwargs)
    scores = [env.score(p, c) for p, c in zip(problems, greedy)]

    n_correct = [0] * len(problems)
    if samples and pass_k:
        sampled = complete(
            model, tok, [p for p in prompts for _ in range(samples)], temperature=temperature, seed=seed, **kwargs
        )
        for i, (p, c) in enumerate(zip((p for p in problems for _ in range(samples)), sampled)):
            n_correct[i // samples] += env.score(p, c)["correct"] == 1.0

    levels: dict[int, list[float]] = defaultdict(list)
    diagnostics: dict[str, list[float]] = defaultdict(list)
    for p, c, s in zip(problems, greedy, scores):
        levels[p.difficulty].append(s["correct"])
        for name, v in env.diagnostics(p, c).items():
            diagnostics[name].append(v)
    return EvalResult(
        task=task or env.name,
        n=len(problems),
        seed=seed,
        accuracy=_mean([s["correct"] for s in scores]),
        pass_at_k={k: _mean([pass_at_k(samples, c, k) for c in n_correct]) for k in pass_k} if samples else {},
        by_difficulty={d: _mean(v) for d, v in sorted(levels.items())},
        rewards={name: _mean([s[name] for s in scores]) for name in env.reward_names},
        diagnostics={name: _mean(v) for name, v in diagnostics.items()},
        records=[
            {
                "prompt": p.prompt,
                "answer": p.answer,
                "completion": c,
                "rewards": s,
                "difficulty": p.difficulty,
                **({"samples_correct": k} if samples else {}),
            }
            for p, c, s, k in zip(problems, greedy, scores, n_correct)
        ],
    )


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
