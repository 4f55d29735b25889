"""Rollouts: an environment's prompts, G sampled completions each from ONE batched KV-cache generation, scored
by the environment's reward functions; then packed into training tensors.

Also what every RL objective shares (`RolloutObjective`: prompts, rollouts, reference log-probs, evaluation,
samples, resumable state) and the hooks of the RL stage (reference reset, rollout tables, training time).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from glasslab.chat import render
from glasslab.config import EvalConfig, RLConfig
from glasslab.data.tokenizer import Tokenizer
from glasslab.envs import ENVIRONMENTS
from glasslab.envs.base import Environment, Problem
from glasslab.errors import GlasslabError
from glasslab.evaluate import completion_text, evaluate_env, prompt_tokens
from glasslab.model.generate import PromptBatch, generate
from glasslab.model.gpt import GPT, PrefixCache
from glasslab.rl.ahead import Ahead
from glasslab.rl.hacking import repeat_rate
from glasslab.rl.losses import token_logprobs, zero_std_groups
from glasslab.tools import ToolInterceptor
from glasslab.track.atomic import append_jsonl, write_bytes_atomic
from glasslab.train.distributed import is_main
from glasslab.train.loop import Hook, StepContext


@dataclass
class Rollout:
    """One batch of sampled completions. Rows are grouped: rows g*G .. g*G+G-1 answer problems[g*G]."""

    problems: list[Problem]  # one per row
    prompts: list[list[int]]
    completions: list[list[int]]  # generated tokens, stop token included, forced tool results included
    sampled: list[list[bool]]  # False for forced tokens: they are not the policy's and are never trained on
    logprobs: list[list[float]]  # log p(token) at temperature 1, recorded while sampling
    truncated: list[bool]  # hit max_new_tokens before <|end|>
    texts: list[str]
    scores: dict[str, list[float]]  # reward function -> value per row
    rewards: Tensor  # (B,) the weighted sum of the scores
    group_size: int
    generation_s: float
    index: int  # which rollout batch of the run (its seed: RolloutObjective.batch_seed)
    # log π_old of the sampled tokens per row, from the policy that sampled them, when the loss needs π_old
    # (GRPO with num_iterations > 1 or rl.generate_ahead); None otherwise
    old: list[list[float]] | None = None
    # with rl.generate_ahead: log π_ref of the sampled tokens of the rows the loss trains on (trained_rows), the
    # time it took, and whether the sampling process scored them (else the trainer did); None until scored
    ref: list[list[float]] | None = None
    reference_s: float = 0.0
    ref_ahead: bool = False
    wait_s: float | None = None  # with rl.generate_ahead: how long the trainer waited for this batch

    def __len__(self) -> int:
        return len(self.completions)

    def metrics(self) -> dict[str, float]:
        """Statistics of what was sampled: rewards, lengths, truncation, generation time."""
        lengths = [len(c) for c in self.completions]
        out = {
            "rl/reward_mean": self.rewards.mean().item(),
            "rl/reward_std": self.rewards.std().item() if len(self) > 1 else 0.0,
            "rl/frac_reward_zero_std": zero_std_groups(self.rewards, self.group_size).float().mean().item(),
            "rl/completion_len_mean": sum(lengths) / len(lengths),
            "rl/completion_len_min": float(min(lengths)),
            "rl/completion_len_max": float(max(lengths)),
            "rl/truncated_ratio": sum(self.truncated) / len(self),
            "rl/repeat_rate": sum(map(repeat_rate, self.completions)) / len(self),
            "time/generation_s": self.generation_s,
        }
        if self.wait_s is not None:  # sampled ahead: how long the trainer waited, and who scored the reference
            out["time/rollout_wait_s"] = self.wait_s
            out["rl/reference_scored_ahead"] = float(self.ref_ahead)
        out |= {f"rl/reward/{name}": sum(v) / len(v) for name, v in self.scores.items()}
        return out

    def records(self, **columns: list) -> list[dict]:
        """One JSON-able row per completion (for the rollout tables), with extra per-row columns."""
        return [
            {
                "group": r // self.group_size,
                "prompt": self.problems[r].prompt,
                "answer": self.problems[r].answer,
                "completion": self.texts[r],
                "reward": self.rewards[r].item(),
                "scores": {name: v[r] for name, v in self.scores.items()},
                "length": len(self.completions[r]),
                "truncated": self.truncated[r],
                **{k: v[r] for k, v in columns.items()},
            }
            for r in range(len(self))
        ]


@dataclass
class Packed:
    """Prompt + completion per row, right-padded, as next-token inputs/targets. Padding only ever follows a
    row's real tokens, so plain causal attention computes each row exactly as it would alone.
    `mask` marks targets that are sampled completion tokens: the only ones a policy loss sees."""

    inputs: Tensor  # (B, L)
    targets: Tensor  # (B, L)
    mask: Tensor  # (B, L) bool
    prompts: list[list[int]]  # per row: inputs[r, :len(prompts[r])]

    def select(self, keep: Tensor) -> Packed:
        """The rows where `keep` (B,) is True."""
        rows = keep.nonzero().squeeze(1)
        return Packed(self.inputs[rows], self.targets[rows], self.mask[rows], [self.prompts[r] for r in rows.tolist()])

    def spread(self, per_row: list[list[float]]) -> Tensor:
        """Per-row values of the masked tokens (in order) laid out at their positions, 0 elsewhere."""
        return self.scatter(torch.tensor([v for row in per_row for v in row], device=self.mask.device))

    def scatter(self, values: Tensor) -> Tensor:
        """(N,) values of the N masked positions in row-major order, laid out (B, L) with 0 elsewhere; gradients
        flow back to `values`."""
        return values.new_zeros(self.mask.shape).masked_scatter(self.mask, values)


def pack(
    prompts: list[list[int]], completions: list[list[int]], sampled: list[list[bool]], pad_id: int, device: torch.device
) -> Packed:
    width = max(len(p) + len(c) for p, c in zip(prompts, completions)) - 1
    inputs = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    targets = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for r, (p, c, s) in enumerate(zip(prompts, completions, sampled)):
        seq = torch.tensor(p + c, dtype=torch.long)
        inputs[r, : len(seq) - 1], targets[r, : len(seq) - 1] = seq[:-1], seq[1:]
        mask[r, len(p) - 1 : len(p) - 1 + len(c)] = torch.tensor(s, dtype=torch.bool)
    return Packed(inputs.to(device), targets.to(device), mask.to(device), prompts)


def sampled_logprobs(rollout: Rollout) -> list[list[float]]:
    """The recorded log-probs of the sampled tokens only, per row, in the order `Packed.spread` expects."""
    return [[lp for lp, s in zip(lps, ss) if s] for lps, ss in zip(rollout.logprobs, rollout.sampled)]


def completion_logits(model: nn.Module, packed: Packed, temperature: float) -> Tensor:
    """Logits (N, V) of the N trained positions (`packed.mask`, row-major) at the sampling temperature (the policy
    that RL optimises is π(·/T)). The policy's loss and the reference and old log-probs all start here, so at
    step 0 the policy and its reference agree to the bit.

    Two forwards, both through `model(...)` (so a DDP wrapper sees them): the distinct prompts but their last
    token, once, then every row's last prompt token and completion, attending to its prompt's keys and values
    (`PrefixCache`, gradients included). A group's G rows share one prompt, so its tokens are computed once
    instead of G times. The head, log-softmax and entropy run on the trained positions alone."""
    device = packed.mask.device
    pb = PromptBatch.of([p[:-1] for p in packed.prompts], 0, device)
    cache = PrefixCache(pb.rows)
    if pb.idx.size(1):  # (with one-token prompts there is nothing to share: the cache stays empty)
        model(pb.idx, positions=pb.positions, mask=pb.mask, cache=cache, select=pb.rows[:0])
    start = torch.tensor([len(p) - 1 for p in packed.prompts], device=device)  # each row's last prompt token
    r, t = packed.mask.nonzero().unbind(1)
    W = int((t - start[r]).max()) + 1 if len(t) else 1
    positions = start[:, None] + torch.arange(W, device=device)
    inputs = packed.inputs.gather(1, positions.clamp(max=packed.inputs.size(1) - 1))  # clamped: padding anyway
    causal = torch.ones(W, W, dtype=torch.bool, device=device).tril().expand(len(start), -1, -1)
    mask = torch.cat([pb.valid[pb.rows][:, None, :].expand(-1, W, -1), causal], dim=2)[:, None]
    logits = model(inputs, positions=positions, mask=mask, cache=cache, select=r * W + t - start[r])
    return logits if temperature == 1.0 else logits / temperature


def sequence_logprobs(model: nn.Module, packed: Packed, temperature: float) -> Tensor:
    """log π(token) at the sampling temperature of every trained target (`packed.mask`), 0 elsewhere: (B, L)."""
    return packed.scatter(token_logprobs(completion_logits(model, packed, temperature), packed.targets[packed.mask]))


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
        self.interceptor = ToolInterceptor(tok)
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


# ---- hooks of the RL stage -------------------------------------------------------------------------

_REFERENCE = re.compile(r"reference-step-(\d+)\.safetensors")
_STEP_DIR = re.compile(r"step-(\d+)")


class ReferenceReset(Hook):
    """Every `every` steps the reference policy becomes a copy of the current policy, so the KL penalty anchors
    to a recent policy instead of the SFT model (as in TRL's sync_ref_model). Each new reference is saved
    beside the checkpoints (checkpoints/rl/reference-step-N.safetensors); a resumed run loads the newest one
    not after its checkpoint, and before the first reset the reference is the SFT model it started from."""

    every_rank = True  # every rank's reference must change together, or their KL terms differ

    def __init__(self, objective: RolloutObjective, every: int, directory: Path) -> None:
        self.objective, self.every, self.directory = objective, every, Path(directory)

    def _saved(self) -> dict[int, Path]:
        files = self.directory.glob("reference-step-*.safetensors") if self.directory.is_dir() else ()
        return {int(m[1]): f for f in files if (m := _REFERENCE.fullmatch(f.name))}

    def on_train_start(self, ctx: StepContext) -> None:
        saved = {s: f for s, f in self._saved().items() if s <= ctx.step}
        if saved:  # before any batch is drawn: the restored batch in flight was scored under this one
            self.objective.ref.load_state_dict(load_file(saved[max(saved)]))

    def on_optimizer_step(self, ctx: StepContext) -> None:
        if ctx.step % self.every:
            return
        weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in ctx.model.state_dict().items()}
        self.objective.reset_reference(weights)
        if not is_main():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.directory / f"reference-step-{ctx.step:07d}.safetensors", safetensors_bytes(weights))
        ctx.run.log_event(
            "notice", f"reference policy reset to the policy at step {ctx.step}", step=ctx.step, stage=ctx.stage
        )
        self._prune()

    def _prune(self) -> None:
        """Keep the references any remaining checkpoint can resume with: from the one in force at the oldest."""
        ckpts = [int(m[1]) for d in self.directory.iterdir() if (m := _STEP_DIR.fullmatch(d.name))]
        saved = self._saved()
        floor = max((s for s in saved if s <= min(ckpts, default=0)), default=None)
        for s, f in saved.items():
            if floor is not None and s < floor:
                f.unlink()


class RolloutTable(Hook):
    """Every `every` steps, the step's completions with their scores (and advantages, for GRPO) go to
    rollouts/step-N.jsonl: the raw material behind every reward curve."""

    def __init__(self, directory: Path, every: int) -> None:
        self.directory, self.every = Path(directory), every

    def on_optimizer_step(self, ctx: StepContext) -> None:
        if not self.every or ctx.step % self.every:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"step-{ctx.step}.jsonl"
        path.unlink(missing_ok=True)  # a resumed run writes the step again
        for record in ctx.batch.records():
            append_jsonl(path, {"step": ctx.step, **record})


class TrainingTime(Hook):
    """time/training_s: from a ready batch to the optimizer step done (policy forward, loss, backward, gradient
    probes, clipping, update), the part of an RL step that is not generation or reference scoring."""

    def on_optimizer_step(self, ctx: StepContext) -> None:
        ctx.metrics["time/training_s"] = time.perf_counter() - ctx.batch.ready_at
