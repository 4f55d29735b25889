"""What every RL objective shares, whatever the algorithm (`RolloutObjective`): the problems of each rollout
batch, sampling them (in one batched KV-cache generation, or ahead in a second process: rl/ahead.py), scoring
them with the environment's rewards, the reference policy's log-probs, evaluation, samples, the probe rows and
the resumable state. GRPO and DPO (objectives/grpo.py, objectives/dpo.py) add next_batch and loss."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from glasslab.chat.format import render
from glasslab.config import EvalConfig, RLConfig
from glasslab.data.tokenizer import Tokenizer
from glasslab.envs import ENVIRONMENTS
from glasslab.envs.base import Environment, Problem
from glasslab.errors import GlasslabError
from glasslab.model.generate import generate
from glasslab.model.gpt import GPT
from glasslab.rl.ahead import Ahead
from glasslab.rl.batch import Packed, Rollout, pack
from glasslab.rl.logprobs import sequence_logprobs
from glasslab.train.evaluate import completion_text, evaluate_env, prompt_tokens


def check_reward_weights(env: Environment, weights: dict[str, float]) -> None:
    """A reward function the environment lacks scores 0, as in a mixture, so one set of weights serves every
    environment (arithmetic's `digits` weight under `--env countdown`); a name nothing scores is a typo."""
    known = set(env.reward_names).union(*(cls.reward_names for cls in ENVIRONMENTS.values()))
    unknown = sorted(set(weights) - known)
    if unknown:
        raise GlasslabError(
            f"rl.reward_weights names {', '.join(unknown)}, which no environment scores: "
            f"use some of {', '.join(env.reward_names)} (environment '{env.name}')"
        )


class RolloutObjective:
    """The parts of an RL objective that do not depend on the algorithm. Subclasses add next_batch and loss."""

    stage = "rl"

    def __init__(
        self,
        env: Environment,
        tok: Tokenizer,
        ref: nn.Module,
        cfg: RLConfig,
        eval_cfg: EvalConfig,
        *,
        seed: int,
        device: torch.device,
        rank: int = 0,
        retention: Sequence[tuple[str, Environment]] = (),
    ) -> None:
        """`retention`: (task, environment) pairs evaluated greedily beside the RL environments, as eval/<task>/...
        (the problems SFT trained on, when RL trains on others: `stages.rl.retention_envs`)."""
        check_reward_weights(env, cfg.reward_weights)
        self.env, self.tok, self.ref, self.cfg, self.eval_cfg = env, tok, ref, cfg, eval_cfg
        self.retention = list(retention)
        self.seed, self.device, self.rank = seed, device, rank
        self.interceptor = tok.chat.interceptor()
        self.rollouts = 0  # rollout batches drawn so far: seeds the next one, so a resumed run draws the same
        self._probe_rows: Tensor | None = None
        self._ahead: Ahead[Rollout] | None = None
        self._next: Rollout | None = None  # the next batch to train on, sampled ahead or restored
        self._ref_changed = False  # a reference reset since the sampling process's copy was refreshed

    def batch_seed(self, index: int) -> int:
        """The seed of rollout batch `index`: its problems and its samples. Under torchrun each rank draws its own
        (rank 0 the same as a single process), so N ranks train on N x prompts_per_step problems a step."""
        return self.seed * 100_003 + index + self.rank * 1_000_000_007

    def problems(self, index: int) -> list[Problem]:
        """The problems of rollout batch `index`, each repeated group_size times (fixed by seed, rank and index)."""
        drawn = self.env.problems("train", self.cfg.prompts_per_step, seed=self.batch_seed(index))
        return [p for p in drawn for _ in range(self.cfg.group_size)]

    def draw(self, model: GPT) -> Rollout:
        """The rollout batch to train on now. Sampled by `model`; with rl.generate_ahead, by a copy of it one
        optimizer step older, in the background during the previous step, and the next batch starts sampling
        before this returns (rl/ahead.py)."""
        if self.cfg.generate_ahead and self._ahead is None:
            self._ahead = Ahead(model, self.ref, self.sample_at)
        t0 = time.perf_counter()
        self._finish_ahead()
        ready, self._next = self._next, None  # sampled ahead, or restored from a checkpoint
        changed, self._ref_changed = self._ref_changed, False
        if self._ahead is None:
            return ready if ready is not None else self.sample(model)
        waited = time.perf_counter() - t0
        copy = self._ahead.refresh(model, self.ref if changed else None)
        if ready is None:  # the run's first batch: nothing was sampled ahead of it
            ready = self.sample(copy)
        self._ahead.start(self.rollouts)
        self.rollouts += 1
        ready.wait_s = waited
        return ready

    def _finish_ahead(self) -> None:
        """Wait for the batch being sampled in the background, if any, and hold it as the next one. If the
        reference was reset after it was scored, its reference log-probs are dropped: the trainer scores it again."""
        if self._ahead is not None and (done := self._ahead.wait()) is not None:
            self._next = done
        if self._next is not None and self._ref_changed:
            self._next.ref, self._next.ref_ahead = None, False

    def reset_reference(self, weights: dict[str, Tensor]) -> None:
        """Make the reference policy these weights (rl.ref_reset_every). Sampling ahead, the batch in flight
        was scored under the reference before; it is scored again, and the sampling process's copy refreshed."""
        self.ref.load_state_dict(weights)
        self._ref_changed = True

    def close(self) -> None:
        """After training: stop sampling ahead (the batch in flight is kept for state_dict)."""
        if self._ahead is not None:
            self._finish_ahead()
            self._ahead.close()
            self._ahead = None

    def sample(self, model: nn.Module) -> Rollout:
        """A fresh rollout batch, with whatever the objective needs from the policy that sampled it."""
        return self.rollout(model)

    def sample_at(self, model: nn.Module, ref: nn.Module, index: int, trainer_waiting: Callable[[], bool]) -> Rollout:
        """`sample` for rollout batch `index`: what the sampling process runs, on its own copy of this objective,
        with its copies of the policy and the reference. If the trainer is still busy with the batch before when
        sampling ends, the process also scores this batch under the reference, which the trainer would otherwise
        do after waiting for it (rl/ahead.py); the computation is the same either way, so the values are too."""
        self.rollouts, self.ref = index, ref
        rollout = self.sample(model)
        if not trainer_waiting():
            self.score_reference(rollout)
            rollout.ref_ahead = True
        return rollout

    def trained_rows(self, rollout: Rollout) -> list[int]:
        """The rows the loss will train on, the only ones whose reference log-probs it needs."""
        return list(range(len(rollout)))

    def score_reference(self, rollout: Rollout) -> None:
        """rollout.ref: log π_ref of each trained row's sampled tokens (`trained_rows` order). With
        rl.generate_ahead, whichever process is free first runs it (`sample_at`): one computation, the same values."""
        t0 = time.perf_counter()
        rows = self.trained_rows(rollout)
        rollout.ref = self.row_logprobs(self.ref, rollout, rows) if rows else []
        rollout.reference_s = time.perf_counter() - t0

    @torch.no_grad()
    def row_logprobs(self, model: nn.Module, rollout: Rollout, rows: Sequence[int] | None = None) -> list[list[float]]:
        """log p(token) under `model` of each row's sampled tokens (one no-grad forward over `rows`, default all),
        as `Packed.spread` takes them."""
        packed = self.pack_rows(rollout, range(len(rollout)) if rows is None else rows)
        logp = sequence_logprobs(model, packed, self.cfg.temperature)
        return [row[m].tolist() for row, m in zip(logp, packed.mask)]

    def pack_rows(self, rollout: Rollout, rows: Sequence[int]) -> Packed:
        """These rows of the batch, in this order, packed for a forward."""
        pick = lambda seqs: [seqs[r] for r in rows]  # noqa: E731
        return pack(
            pick(rollout.prompts), pick(rollout.completions), pick(rollout.sampled), self.tok.pad_id, self.device
        )

    def __getstate__(self) -> dict:
        """The copy the sampling process gets (rl/ahead.py): all but the reference model and the batches in hand."""
        return self.__dict__ | {"ref": None, "_ahead": None, "_next": None}

    def rollout(self, model: nn.Module) -> Rollout:
        """prompts_per_step fresh training problems x group_size completions, all in one generate() call."""
        index = self.rollouts
        problems = self.problems(index)
        prompts = [prompt_tokens(self.env, p, self.tok) for p in problems]
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, enabled=False):  # sampling is float32, also inside a bf16 step
            out = generate(
                model,
                prompts,
                self.cfg.max_new_tokens,
                temperature=self.cfg.temperature,
                stop_ids=(self.tok.end_id,),
                pad_id=self.tok.pad_id,
                seed=self.batch_seed(index),
                interceptor=self.interceptor,
            )
        self.rollouts += 1
        elapsed = time.perf_counter() - t0
        return self.scored(problems, prompts, out.tokens, out.sampled, out.logprobs, out.truncated, elapsed, index)

    def scored(
        self,
        problems: list[Problem],
        prompts: list[list[int]],
        completions: list[list[int]],
        sampled: list[list[bool]],
        logprobs: list[list[float]],
        truncated: list[bool],
        generation_s: float,
        index: int,
    ) -> Rollout:
        """Score completions with every reward function; the reward is their weighted sum."""
        texts = [completion_text(self.tok, c) for c in completions]
        per_row = [self.env.score(p, t) for p, t in zip(problems, texts)]
        scores = {name: [s[name] for s in per_row] for name in self.env.reward_names}
        weights = self.cfg.reward_weights
        rewards = torch.tensor(
            [sum(w * s.get(name, 0.0) for name, w in weights.items()) for s in per_row], device=self.device
        )
        g = self.cfg.group_size
        return Rollout(
            problems, prompts, completions, sampled, logprobs, truncated, texts, scores, rewards, g, generation_s, index
        )

    @torch.no_grad()
    def reference_logprobs(self, packed: Packed) -> Tensor:
        return sequence_logprobs(self.ref, packed, self.cfg.temperature)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Greedy accuracy (overall, per difficulty), reward means and pass@k on the environment's held-out
        problems: the same ones at every evaluation, so the curve starts comparably at the SFT model."""
        e, out = self.eval_cfg, {}
        for env in self.env.parts():  # a mixture's members one by one
            out |= evaluate_env(
                model,
                self.tok,
                env,
                n=self.cfg.eval_n,
                seed=self.seed,
                pass_k=tuple(e.pass_k),
                samples=e.samples,
                temperature=e.temperature,
                max_new_tokens=self.cfg.max_new_tokens,
                split="eval",
            ).metrics()
        for task, env in self.retention:  # greedy only: accuracy and its split by difficulty show the forgetting
            out |= evaluate_env(
                model,
                self.tok,
                env,
                n=self.cfg.eval_n,
                seed=self.seed,
                samples=0,
                max_new_tokens=self.cfg.max_new_tokens,
                split="eval",
                task=task,
            ).metrics()
        return out

    def samples(self, model: nn.Module, n: int = 4) -> list[dict]:
        """Greedy answers to a few held-out problems, with their rewards."""
        problems = self.env.problems("eval", n, seed=self.seed)
        out = generate(
            model,
            [prompt_tokens(self.env, p, self.tok) for p in problems],
            self.cfg.max_new_tokens,
            temperature=0.0,
            stop_ids=(self.tok.end_id,),
            pad_id=self.tok.pad_id,
            interceptor=self.interceptor,
        )
        texts = [completion_text(self.tok, c) for c in out.tokens]
        return [
            {"prompt": p.prompt, "answer": p.answer, "completion": t, "scores": self.env.score(p, t)}
            for p, t in zip(problems, texts)
        ]

    def probe_inputs(self) -> Tensor:
        """Eight held-out problems with their ideal answers, right-padded: the fixed rows the attention and
        activation probes read, so their values compare across steps (and with SFT)."""
        if self._probe_rows is None:
            rows = []
            for p in self.env.problems("eval", 8, seed=self.seed):
                rows.append(render(self.env.ideal_conversation(p), self.tok)[0])
            width = max(map(len, rows))
            self._probe_rows = torch.tensor(
                [r + [self.tok.pad_id] * (width - len(r)) for r in rows], device=self.device
            )
        return self._probe_rows

    def state_dict(self) -> dict:
        """The rollout counter and the batch sampled ahead for the next step, if any (waiting for it): a resumed
        run trains on the same batches."""
        self._finish_ahead()
        ahead = self.rollout_state(self._next) if self._next is not None else None
        return {"rollouts": self.rollouts, "ahead": ahead}

    def load_state_dict(self, state: dict) -> None:
        self.rollouts = state["rollouts"]
        self._next = self.restore_rollout(state["ahead"]) if state.get("ahead") else None

    @staticmethod
    def rollout_state(r: Rollout) -> dict:
        """What a checkpoint keeps of a rollout batch: everything else is recomputed from it."""
        return {
            "index": r.index,
            "completions": r.completions,
            "sampled": r.sampled,
            "logprobs": r.logprobs,
            "truncated": r.truncated,
            "old": r.old,
            "ref": r.ref,
            "ref_ahead": r.ref_ahead,
        }

    def restore_rollout(self, s: dict) -> Rollout:
        problems = self.problems(s["index"])
        prompts = [prompt_tokens(self.env, p, self.tok) for p in problems]
        rollout = self.scored(
            problems, prompts, s["completions"], s["sampled"], s["logprobs"], s["truncated"], 0.0, s["index"]
        )
        rollout.old, rollout.ref, rollout.ref_ahead = s["old"], s.get("ref"), s.get("ref_ahead", False)
        return rollout
