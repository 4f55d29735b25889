"""RL: the loss math against plain-loop reference computations, rollouts and their packing, the GRPO and DPO
objectives on a tiny model with a fake environment, the reward-hacking detectors, and the stage end to end."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from glasslab.config import GRPOConfig, ModelConfig, RLConfig, build_config, resolve
from glasslab.data.tokenizer import Tokenizer
from glasslab.envs.base import Environment, Problem, final_answer
from glasslab.envs.mixture import Mixture
from glasslab.errors import GlasslabError
from glasslab.model.generate import generate
from glasslab.model.gpt import GPT
from glasslab.objectives.dpo import DPO, preference_pairs
from glasslab.objectives.grpo import GRPO
from glasslab.rl.ahead import Ahead
from glasslab.rl.batch import pack
from glasslab.rl.hacking import HackingDetectors, repeat_rate
from glasslab.rl.logprobs import completion_logits, sequence_logprobs
from glasslab.rl.losses import (
    aggregate,
    dpo_loss,
    group_advantages,
    grpo_token_loss,
    kl_estimate,
    token_logprobs,
    token_logprobs_and_entropy,
    zero_std_groups,
)
from glasslab.stages.common import save_config
from glasslab.track.checkpoint import save_checkpoint
from glasslab.track.metrics import read_metrics
from glasslab.track.rundir import RunDir
from glasslab.train.evaluate import prompt_tokens

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread

# ---- the loss math -----------------------------------------------------------------------------


def test_group_advantages_match_plain_loops():
    torch.manual_seed(0)
    rewards, g = torch.rand(12), 4
    for scale in ("group", "batch", "none"):
        got = group_advantages(rewards, g, scale)
        r = rewards.tolist()
        batch_mean = sum(r) / len(r)
        batch_std = math.sqrt(sum((x - batch_mean) ** 2 for x in r) / (len(r) - 1))
        for i in range(len(r)):
            grp = r[i // g * g : i // g * g + g]
            mean = sum(grp) / g
            std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (g - 1))
            expected = (r[i] - mean) / ({"group": std, "batch": batch_std, "none": 1.0 - 1e-4}[scale] + 1e-4)
            assert got[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6), (scale, i)


def test_constant_reward_groups_get_zero_advantage():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5])
    for scale in ("group", "batch", "none"):
        adv = group_advantages(rewards, 3, scale)
        assert torch.equal(adv[:6], torch.zeros(6))
        assert adv[6:].abs().sum() > 0
    assert zero_std_groups(rewards, 3).tolist() == [True, True, False]


def test_kl_estimators():
    logp = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    ref = torch.log(torch.tensor([0.4, 0.5, 0.3]))
    for kind in ("k1", "k2", "k3"):
        assert torch.allclose(kl_estimate(logp, logp, kind), torch.zeros(3))
    log_r = ref - logp
    assert torch.allclose(kl_estimate(logp, ref, "k1"), -log_r)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), 0.5 * log_r**2)
    k3 = kl_estimate(logp, ref, "k3")
    assert torch.allclose(k3, log_r.exp() - 1 - log_r)
    assert k3[1] == 0 and (k3[[0, 2]] > 0).all()
    # k1 and k3 are unbiased: on tokens sampled from p, their mean is KL(p || q)
    p, q = torch.tensor([0.5, 0.3, 0.1, 0.1]), torch.tensor([0.25, 0.25, 0.25, 0.25])
    true_kl = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k3"):
        assert kl_estimate(p.log()[x], q.log()[x], kind).mean().item() == pytest.approx(true_kl, abs=5e-3)


def grpo_loss(logp, old, ref, adv, mask, *, loss_type, max_new_tokens, **terms):
    """The GRPO objective's loss: the per-token loss reduced as loss_type says (objectives/grpo.py)."""
    per_token, stats = grpo_token_loss(logp, old, ref, adv, mask, **terms)
    return aggregate(per_token, mask, loss_type, max_new_tokens), stats


def token_entropy(logits):
    """Next-token entropy by autograd through a log-softmax: the reference the fused op is checked against."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _reference_grpo(logp, old, ref, adv, mask, ent, *, eps_low, eps_high, beta, coef, loss_type, max_new):
    """The GRPO loss written token by token."""
    rows, n_low, n_high, n = [], 0, 0, 0
    for b in range(logp.size(0)):
        terms = []
        for t in range(logp.size(1)):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logp[b, t] - old[b, t])
            clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            surrogate = torch.min(ratio * adv[b], clipped * adv[b])
            d = ref[b, t] - logp[b, t]
            kl = torch.exp(d) - d - 1
            terms.append(-surrogate + beta * kl - coef * ent[b, t])
            n_low += bool(ratio < 1 - eps_low and adv[b] < 0)
            n_high += bool(ratio > 1 + eps_high and adv[b] > 0)
            n += 1
        rows.append(terms)
    if loss_type == "grpo":
        loss = sum(sum(r) / len(r) for r in rows) / len(rows)
    elif loss_type in ("bnpo", "dapo"):
        loss = sum(sum(r) for r in rows) / n
    else:
        loss = sum(sum(r) for r in rows) / (len(rows) * max_new)
    return loss, n_low / n, n_high / n


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_grpo_loss_and_gradient_match_reference(loss_type):
    torch.manual_seed(1)
    B, T, f64 = 4, 6, torch.float64
    logp = (torch.rand(B, T, dtype=f64) * -3).requires_grad_()
    ent = torch.rand(B, T, dtype=f64).requires_grad_()
    old = logp.detach() + torch.empty(B, T, dtype=f64).uniform_(
        -0.6, 0.6
    )  # ratios well outside [0.8, 1.28]: both clips fire
    ref = logp.detach() + torch.randn(B, T, dtype=f64) * 0.3
    adv = torch.tensor([1.5, -0.7, 0.4, -1.2], dtype=f64)
    mask = torch.rand(B, T) > 0.3
    mask[:, 0] = True
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.05)
    loss, stats = grpo_loss(
        logp,
        old,
        ref,
        adv,
        mask,
        kl_estimator="k3",
        loss_type=loss_type,
        max_new_tokens=8,
        entropy=ent,
        entropy_coef=0.01,
        **kw,
    )
    expected, low, high = _reference_grpo(
        logp, old, ref, adv, mask, ent, coef=0.01, loss_type=loss_type, max_new=8, **kw
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    for got, want in zip(torch.autograd.grad(loss, [logp, ent]), torch.autograd.grad(expected, [logp, ent])):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert stats["rl/clip_ratio_low"] == pytest.approx(low) and stats["rl/clip_ratio_high"] == pytest.approx(high)
    assert low > 0 and high > 0
    assert stats["rl/clip_ratio_region"] == pytest.approx(low + high)


def test_one_iteration_has_ratio_one_and_never_clips():
    torch.manual_seed(2)
    logp = (torch.rand(3, 5) * -3).requires_grad_()
    adv = torch.tensor([2.0, -2.0, 0.5])
    mask = torch.ones(3, 5, dtype=torch.bool)
    loss, stats = grpo_loss(
        logp,
        None,
        logp.detach(),
        adv,
        mask,
        eps_low=0.0,
        eps_high=0.0,
        beta=0.1,
        kl_estimator="k3",
        loss_type="dapo",
        max_new_tokens=5,
    )
    assert stats["rl/clip_ratio_region"] == 0.0 and stats["rl/kl_old"] == 0.0 and stats["rl/kl_ref"] == 0.0
    assert loss.item() == pytest.approx(-adv.mean().item())  # ρ = 1 exactly: the loss is -mean(A) per token
    (grad,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(grad, -adv[:, None].expand(3, 5) / 15)  # even with zero clip range, the gradient flows


def test_kl_ref_is_reported_at_beta_zero_and_adds_nothing():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    args = (logp, None, ref, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool))
    kw = dict(eps_low=0.2, eps_high=0.2, kl_estimator="k3", loss_type="grpo", max_new_tokens=2)
    loss0, stats0 = grpo_loss(*args, beta=0.0, **kw)
    loss1, stats1 = grpo_loss(*args, beta=1.0, **kw)
    assert stats0["rl/kl_ref"] == stats1["rl/kl_ref"] > 0
    assert loss1.item() == pytest.approx(loss0.item() + stats0["rl/kl_ref"])


def test_dpo_loss_matches_formula():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.1)
    rows = zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())
    expected = [-math.log(1 / (1 + math.exp(-0.1 * ((a - c) - (b - d))))) for a, b, c, d in rows]
    assert loss.item() == pytest.approx(sum(expected) / 2)
    assert torch.allclose(chosen, 0.1 * (pc - rc)) and torch.allclose(rejected, 0.1 * (pr - rr))


def test_token_logprobs_and_entropy():
    logits = torch.randn(2, 3, 7)
    targets = torch.randint(0, 7, (2, 3))
    p = logits.softmax(-1)
    assert torch.allclose(
        token_logprobs(logits, targets), p.gather(-1, targets[..., None]).squeeze(-1).log(), atol=1e-6
    )
    _, entropy = token_logprobs_and_entropy(logits.view(-1, 7), targets.view(-1))
    assert torch.allclose(entropy.view(2, 3), -(p * p.log()).sum(-1), atol=1e-6)


@pytest.mark.parametrize("entropy_grad", [False, True])
def test_fused_logprobs_and_entropy_match_autograd(entropy_grad):
    """The fused op's values and hand-written backward equal autograd's through a log-softmax, in float64, with
    the entropy trained on (an entropy bonus) or only logged (detached, its gradient never asked for)."""
    torch.manual_seed(0)
    logits = (4 * torch.randn(12, 9, dtype=torch.float64)).requires_grad_()
    targets = torch.randint(0, 9, (12,))
    a, b = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)

    def objective(fn):
        logp, entropy = fn(logits, targets)
        (logp * a + (entropy * b if entropy_grad else entropy.detach())).sum().backward()
        grad, logits.grad = logits.grad, None
        return logp.detach(), entropy.detach(), grad

    fused = objective(token_logprobs_and_entropy)
    plain = objective(lambda x, t: (token_logprobs(x, t), token_entropy(x)))
    for got, want in zip(fused, plain):
        assert torch.allclose(got, want, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x: token_logprobs_and_entropy(x, targets), (logits.detach().requires_grad_(),)
    )


def test_fused_logprobs_and_entropy_in_bfloat16():
    """bf16 logits (a CPU autocast head) are read in float32: no underflow at large logits, a bf16 gradient."""
    logits = (30 * torch.randn(5, 64)).bfloat16().requires_grad_()
    targets = torch.randint(0, 64, (5,))
    logp, entropy = token_logprobs_and_entropy(logits, targets)
    assert logp.dtype == torch.float32 and torch.isfinite(logp).all() and (entropy >= -1e-5).all()
    assert torch.allclose(logp, token_logprobs(logits.float(), targets), atol=1e-5)
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.allclose(
        logits.grad.float().sum(-1), torch.zeros(5), atol=1e-2
    )


# ---- a fake environment and a tiny model -------------------------------------------------------

LETTERS = "abcdefgh"


class FakeEnv(Environment):
    """`say abc` -> `abc`. `correct` rewards a completion containing the answer's first letter, which a random
    tiny model does often enough that groups carry signal."""

    name = "fake"
    reward_names = ("correct", "format")

    def sample_problem(self, rng: random.Random) -> Problem:
        x = "".join(rng.choice(LETTERS) for _ in range(3))
        return Problem(f"say {x}", x, 1)

    def ideal_answer(self, problem: Problem) -> list[tuple[str, str]]:
        return [("assistant", problem.answer)]

    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        return {
            "correct": float(problem.answer[0] in completion),
            "format": float(final_answer(completion) is not None),
        }


class ConstantEnv(FakeEnv):
    def score(self, problem: Problem, completion: str) -> dict[str, float]:
        return {"correct": 1.0, "format": 1.0}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([f"say {LETTERS} {LETTERS.upper()} 0123456789 .,!?\n" * 4], "char", 0)


@pytest.fixture
def mcfg(tok: Tokenizer) -> ModelConfig:
    return ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64)


def _models(mcfg: ModelConfig) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    model = GPT(mcfg)
    ref = GPT(mcfg)
    ref.load_state_dict(model.state_dict())
    return model, ref.eval().requires_grad_(False)


def _objective(cls, tok, ref, env=None, rank=0, **rl):
    """GRPO's own settings (GRPOConfig's fields) go to rl.grpo, the rest to rl."""
    grpo = GRPOConfig(**{k: rl.pop(k) for k in list(rl) if k in GRPOConfig.model_fields})
    cfg = RLConfig(**{"group_size": 4, "prompts_per_step": 3, "max_new_tokens": 8, "eval_n": 4} | rl, grpo=grpo)
    return cls(env or FakeEnv(), tok, ref, cfg, build_config({}).eval, seed=0, device=CPU, rank=rank)


# ---- rollouts ----------------------------------------------------------------------------------


def test_pack_marks_sampled_tokens_and_recorded_logprobs_match_the_training_forward(tok, mcfg):
    model, _ = _models(mcfg)
    forced_ids = tok.encode("!!")

    def force_after_second(row: int, completion: list[int]) -> list[int] | None:
        return forced_ids if len(completion) == 2 and row % 2 == 0 else None

    env = FakeEnv()
    prompts = [prompt_tokens(env, p, tok) for p in env.problems("train", 4, seed=0)]
    out = generate(
        model,
        prompts,
        6,
        temperature=1.0,
        stop_ids=(tok.end_id,),
        pad_id=tok.pad_id,
        seed=0,
        interceptor=force_after_second,
    )
    packed = pack(prompts, out.tokens, out.sampled, tok.pad_id, CPU)
    for r, (p, c, s) in enumerate(zip(prompts, out.tokens, out.sampled)):
        start = len(p) - 1
        assert packed.inputs[r, : len(p)].tolist() == p
        assert packed.targets[r, start : start + len(c)].tolist() == c
        assert packed.mask[r].tolist() == [False] * start + s + [False] * (packed.mask.size(1) - start - len(c))
        if r % 2 == 0 and len(c) >= 4:
            assert s[2:4] == [False, False] and c[2:4] == forced_ids  # forced tokens are never trained on
    with torch.no_grad():
        logp = sequence_logprobs(model, packed, 1.0)
    # the log-probs recorded while sampling are the training forward's: π_old needs no extra forward at T = 1
    recorded = packed.spread([[lp for lp, ok in zip(lps, ss) if ok] for lps, ss in zip(out.logprobs, out.sampled)])
    assert torch.allclose(logp[packed.mask], recorded[packed.mask], atol=1e-5)
    # the head runs on the trained positions only, with the full forward's numbers there and 0 elsewhere
    with torch.no_grad():
        full, tempered = (
            token_logprobs(model(packed.inputs) / 0.7, packed.targets),
            sequence_logprobs(model, packed, 0.7),
        )
    assert torch.allclose(tempered[packed.mask], full[packed.mask], atol=1e-5) and not tempered[~packed.mask].any()


def test_shared_prompt_forward_has_the_full_forwards_logits_and_gradient():
    """completion_logits computes each distinct prompt once and continues every row from its keys and values;
    the logits and the gradient must be those of running every row's whole sequence (prompts of different
    lengths, shared by 1-3 rows, forced tokens, a one-token completion, a row with nothing trained)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64, vocab_size=50, qk_norm=True))
    prompts = [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5], [4, 5], [7, 8, 9, 10], [6]]
    completions = [[11, 12, 13, 14], [15], [16, 17], [18, 19, 20, 21, 22], [23, 24], [25], [26, 27]]
    sampled = [
        [True, True, False, True],
        [True],
        [True, True],
        [True, False, False, True, True],
        [True, True],
        [True],
        [False, False],
    ]
    packed = pack(prompts, completions, sampled, 0, CPU)
    weights = torch.randn(packed.mask.sum().item(), 50)

    def loss_and_grads(logits: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = (logits.log_softmax(-1) * weights).sum()
        return logits.detach(), [g.clone() for g in torch.autograd.grad(loss, list(model.parameters()))]

    shared, shared_grads = loss_and_grads(completion_logits(model, packed, 1.0))
    full, full_grads = loss_and_grads(model(packed.inputs).flatten(0, 1)[packed.mask.flatten()])
    assert torch.allclose(shared, full, atol=1e-5)
    for a, b in zip(shared_grads, full_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_reward_weights_must_name_reward_functions(tok, mcfg):
    _, ref = _models(mcfg)
    with pytest.raises(GlasslabError, match="correctness, which no environment scores: use some of correct, format"):
        _objective(GRPO, tok, ref, reward_weights={"correctness": 1.0})


def test_a_reward_function_the_environment_lacks_scores_zero(tok, mcfg):
    """A `digits` weight (arithmetic's partial credit) adds nothing on an environment without it."""
    _, ref = _models(mcfg)
    obj = _objective(GRPO, tok, ref, prompts_per_step=1, reward_weights={"correct": 1.0, "digits": 0.5, "format": 0.1})
    problems = obj.problems(0)
    right, wrong = tok.encode(problems[0].answer[0] + "<|end|>"), tok.encode("?")
    completions = [right, wrong, right, wrong]
    prompts = [prompt_tokens(obj.env, p, tok) for p in problems]
    sampled, logprobs = [[True] * len(c) for c in completions], [[0.0] * len(c) for c in completions]
    rollout = obj.scored(problems, prompts, completions, sampled, logprobs, [False] * 4, 0.0, 0)
    assert rollout.rewards.tolist() == pytest.approx([1.1, 0.0, 1.1, 0.0])


# ---- GRPO --------------------------------------------------------------------------------------


def test_grpo_step_logs_the_metrics_and_trains_sampled_tokens(tok, mcfg):
    model, ref = _models(mcfg)
    obj = _objective(GRPO, tok, ref, drop_zero_std=False, mask_truncated=False)
    batch = obj.next_batch(model)
    assert len(batch.rollout) == 12 and obj.rollouts == 1
    loss, parts = obj.loss(model, batch)
    loss.backward()
    assert model.wte.weight.grad is not None and model.wte.weight.grad.abs().sum() > 0
    for name in (
        "rl/reward_mean",
        "rl/reward_std",
        "rl/reward/correct",
        "rl/reward/format",
        "rl/frac_reward_zero_std",
        "rl/advantage_min",
        "rl/advantage_mean",
        "rl/advantage_max",
        "rl/completion_len_mean",
        "rl/completion_len_min",
        "rl/completion_len_max",
        "rl/truncated_ratio",
        "rl/entropy",
        "rl/kl_ref",
        "rl/kl_old",
        "rl/clip_ratio_low",
        "rl/clip_ratio_high",
        "rl/clip_ratio_region",
        "rl/repeat_rate",
        "time/generation_s",
        "time/reference_s",
        "train/loss",
    ):
        assert math.isfinite(parts[name]), name
    assert parts["rl/kl_ref"] == 0.0  # policy == reference before any update, and the same computation to the bit
    assert parts["rl/clip_ratio_region"] == 0.0
    assert obj.batch_tokens(batch) == sum(len(c) for c in batch.rollout.completions)
    records = batch.records()
    assert len(records) == 12 and {"advantage", "reward", "scores", "completion", "trained"} <= set(records[0])


def test_a_set_grpo_setting_reaches_the_loss(tok, mcfg, monkeypatch):
    """`--set rl.grpo.beta=0.2` is the β the GRPO loss weighs the KL with (and not a default beside it)."""
    import glasslab.objectives.grpo as grpo_module

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return grpo_token_loss(*args, **kwargs)

    monkeypatch.setattr(grpo_module, "grpo_token_loss", spy)
    sets = ["rl.grpo.beta=0.2", "rl.grpo.eps_high=0.5", "rl.grpo.mask_truncated=false", "rl.grpo.drop_zero_std=false"]
    rl = resolve(None, overrides=sets).rl
    model, ref = _models(mcfg)
    obj = GRPO(
        FakeEnv(),
        tok,
        ref,
        rl.model_copy(update={"group_size": 4, "prompts_per_step": 1}),
        build_config({}).eval,
        seed=0,
        device=CPU,
    )
    obj.loss(model, obj.next_batch(model))
    assert seen["beta"] == 0.2 and seen["eps_high"] == 0.5


def test_probe_methods(tok, mcfg):
    model, ref = _models(mcfg)
    # every completion trained on: a tiny random model stops within 8 tokens only ~1 time in 6, so with truncated
    # completions masked, whether any token is trained on would depend on the draw
    obj = _objective(GRPO, tok, ref, drop_zero_std=False, mask_truncated=False)
    rows = obj.probe_inputs()
    assert rows.shape[0] == 8 and torch.equal(rows, obj.probe_inputs())
    batch = obj.next_batch(model)
    per_token = obj.token_losses(model, batch)
    assert torch.equal(per_token.isnan(), ~batch.packed.mask)
    loss, _ = obj.loss(model, batch)  # dapo: the mean over trained tokens
    assert per_token.nanmean().item() == pytest.approx(loss.item(), abs=1e-6)
    assert obj.batch_ids(batch)[1].shape == per_token.shape


def test_num_iterations_reuses_the_batch_and_the_ratio_moves(tok, mcfg):
    model, ref = _models(mcfg)
    obj = _objective(
        GRPO, tok, ref, num_iterations=2, drop_zero_std=False, mask_truncated=False, eps_low=0.01, eps_high=0.01
    )
    first = obj.next_batch(model)
    assert first.old_logp is not None
    loss, parts = obj.loss(model, first)
    assert parts["rl/kl_old"] < 1e-8  # π_old is the recorded sampling log-probs of this very policy
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    second = obj.next_batch(model)
    assert second is first and obj.rollouts == 1 and second.uses == 2
    _, parts = obj.loss(model, second)
    assert parts["rl/kl_old"] > 0 and parts["rl/clip_ratio_region"] > 0
    assert "rl/reward_mean" not in parts  # rollout statistics are logged once, with the step that drew them
    assert obj.next_batch(model) is not first and obj.rollouts == 2


def test_old_logprobs_are_recomputed_when_sampling_is_tempered(tok, mcfg):
    model, ref = _models(mcfg)
    obj = _objective(GRPO, tok, ref, num_iterations=2, drop_zero_std=False, temperature=0.7)
    batch = obj.next_batch(model)
    with torch.no_grad():
        logp = sequence_logprobs(model, batch.packed, 0.7)
    assert torch.allclose(batch.old_logp[batch.packed.mask], logp[batch.packed.mask], atol=1e-5)
    _, parts = obj.loss(model, batch)
    assert parts["rl/kl_old"] < 1e-8


def test_a_bfloat16_step_compares_log_probs_of_one_precision(tok, mcfg):
    """Under autocast (system.precision), the reference and the old policy run in the loss's arithmetic, so at
    the start of a step policy = old = reference exactly; sampling itself stays float32."""
    model, ref = _models(mcfg)
    obj = _objective(GRPO, tok, ref, num_iterations=2, drop_zero_std=False, mask_truncated=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch = obj.next_batch(model)
        _, parts = obj.loss(model, batch)
    assert parts["rl/kl_ref"] == 0.0 and parts["rl/kl_old"] == 0.0 and parts["rl/clip_ratio_region"] == 0.0
    float32 = _objective(GRPO, tok, ref, num_iterations=2, drop_zero_std=False, mask_truncated=False)
    assert float32.next_batch(model).rollout.completions == batch.rollout.completions


def test_a_batch_with_iterations_left_survives_a_checkpoint(tok, mcfg):
    model, ref = _models(mcfg)
    obj = _objective(GRPO, tok, ref, num_iterations=3, drop_zero_std=False)
    batch = obj.next_batch(model)
    state = json.loads(json.dumps(obj.state_dict()))
    restored = _objective(GRPO, tok, ref, num_iterations=3, drop_zero_std=False)
    restored.load_state_dict(state)
    again = restored.next_batch(model)
    assert again.uses == 2 and restored.rollouts == 1
    for name in ("advantages", "old_logp", "ref_logp"):
        assert torch.equal(getattr(again, name), getattr(batch, name)), name
    assert torch.equal(again.packed.inputs, batch.packed.inputs) and torch.equal(again.packed.mask, batch.packed.mask)


def _sgd(model: GPT, loss: torch.Tensor, lr: float = 0.5) -> None:
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None


def test_generating_ahead_trains_on_batches_sampled_one_step_before(tok, mcfg):
    """Batch k+1 is sampled in the background by the weights that train on batch k, and its π_old log-probs
    are that policy's; the trained model's probe hooks never see the background sampling."""
    model, ref = _models(mcfg)
    seen = []
    model.blocks[0].register_forward_hook(lambda *_: seen.append(1))
    ahead = _objective(GRPO, tok, ref, generate_ahead=True, drop_zero_std=False, mask_truncated=False)
    sync = _objective(GRPO, tok, ref, drop_zero_std=False, mask_truncated=False)
    theta0 = copy.deepcopy(model)
    first = ahead.next_batch(model)
    assert seen == [] and first.old_logp is not None
    assert first.rollout.completions == sync.next_batch(theta0).rollout.completions
    loss, parts = ahead.loss(model, first)
    assert parts["rl/kl_old"] < 1e-8  # sampled by these very weights
    _sgd(model, loss)
    seen.clear()
    second = ahead.next_batch(model)  # sampled by θ0 while step 0 trained
    assert seen == [] and "time/rollout_wait_s" in second.metrics
    assert second.rollout.completions == sync.next_batch(theta0).rollout.completions
    with torch.no_grad():
        old = sequence_logprobs(theta0, second.packed, 1.0)
        reference = sequence_logprobs(ref, second.packed, 1.0)
    assert torch.allclose(second.old_logp, old, atol=1e-5)
    assert torch.allclose(second.ref_logp, reference, atol=1e-5)  # scored by either process (test below)
    _, parts = ahead.loss(model, second)
    assert parts["rl/kl_old"] > 0  # the policy trained is one step newer than the one that sampled
    ahead.close()


def test_a_reference_reset_while_sampling_ahead_scores_the_batch_in_flight_again(tok, mcfg):
    """The batch in flight at a reset was scored under the old reference in the sampling process: the trainer
    scores it under the new one (also in a checkpoint taken then), and the batch after comes from the new copy."""
    model, ref = _models(mcfg)
    obj = _objective(GRPO, tok, ref, generate_ahead=True, drop_zero_std=False, mask_truncated=False)
    _sgd(model, obj.loss(model, obj.next_batch(model))[0])
    obj.reset_reference({k: v.detach().clone() for k, v in model.state_dict().items()})  # as ReferenceReset does
    assert obj.state_dict()["ahead"]["ref"] is None  # a resumed run scores it under the reference it loads
    for in_flight in (True, False):  # the batch in flight at the reset, then the one sampled after it
        batch = obj.next_batch(model)
        assert not (in_flight and batch.rollout.ref_ahead)  # what the sampling process scored was dropped
        with torch.no_grad():
            expected = sequence_logprobs(ref, batch.packed, 1.0) * batch.packed.mask  # the new reference
        assert torch.allclose(batch.ref_logp, expected, atol=1e-5)
        _sgd(model, obj.loss(model, batch)[0])
    obj.close()


def test_generating_ahead_leaves_the_trainers_random_stream_alone(tok, mcfg):
    model, ref = _models(mcfg)
    obj = _objective(GRPO, tok, ref, generate_ahead=True)
    state = torch.get_rng_state()
    obj.next_batch(model)  # makes the sampling copy, whose init would draw from the global generator
    assert torch.equal(torch.get_rng_state(), state)  # dropout masks after a resume match a straight run's
    obj.close()


def test_a_batch_sampled_ahead_survives_a_checkpoint(tok, mcfg):
    model, ref = _models(mcfg)
    obj = _objective(GRPO, tok, ref, generate_ahead=True, drop_zero_std=False)
    _sgd(model, obj.loss(model, obj.next_batch(model))[0])
    state = json.loads(json.dumps(obj.state_dict()))  # waits for the batch sampled in the background
    assert state["ahead"]["index"] == 1 and state["rollouts"] == 2
    restored = _objective(GRPO, tok, ref, generate_ahead=True, drop_zero_std=False)
    restored.load_state_dict(state)
    again, expected = restored.next_batch(model), obj.next_batch(model)
    assert again.rollout.completions == expected.rollout.completions
    for name in ("advantages", "old_logp", "ref_logp"):
        assert torch.equal(getattr(again, name), getattr(expected, name)), name
    assert restored.next_batch(model).rollout.completions == obj.next_batch(model).rollout.completions
    restored.close(), obj.close()


@pytest.mark.parametrize("cls", [GRPO, DPO])
def test_the_reference_scores_are_the_same_whichever_process_computes_them(tok, mcfg, cls):
    """Sampling ahead, the sampling process scores the batch under the reference if the trainer is still busy,
    else the trainer does: the same computation, so the same bits, and a run does not depend on the timing."""
    model, ref = _models(mcfg)
    obj = _objective(cls, tok, ref, generate_ahead=True, mask_truncated=False)
    batches = []
    for waiting in (False, True):
        obj.close()  # nothing in flight: the next step trains on the batch handed to it
        obj._next = obj.sample_at(model, ref, 0, lambda w=waiting: w)
        batches.append(obj.next_batch(model))
    obj.close()
    ahead, trainer = batches
    assert ahead.rollout.completions == trainer.rollout.completions and len(ahead.ref_logp) > 0
    assert torch.equal(ahead.ref_logp, trainer.ref_logp)
    assert ahead.metrics["rl/reference_scored_ahead"] == 1.0 and trainer.metrics["rl/reference_scored_ahead"] == 0.0


def _failing_sample(
    model: GPT, ref: GPT, index: int, trainer_waiting
) -> None:  # module level: the sampling process unpickles it
    raise GlasslabError(f"batch {index} could not be sampled")


def test_an_error_while_sampling_ahead_reaches_the_trainer(mcfg):
    ahead = Ahead(GPT(mcfg), GPT(mcfg), _failing_sample)
    ahead.start(3)
    with pytest.raises(GlasslabError, match="batch 3 could not be sampled"):
        ahead.wait()
    ahead.close()


def _pid_after(model: GPT, ref: GPT, tenths: int, trainer_waiting) -> int:
    time.sleep(tenths / 10)
    return os.getpid()


def _reference_sum(model: GPT, ref: GPT, index: int, trainer_waiting=None) -> float:
    return sum(p.sum().item() for p in ref.parameters())


def test_the_sampling_process_keeps_its_reference_until_given_a_new_one(mcfg):
    """The reference copy changes only when refresh is given the reference (rl.ref_reset_every)."""
    policy, ref = GPT(mcfg), GPT(mcfg)
    ahead = Ahead(policy, ref, _reference_sum)
    ahead.start(0)
    before = ahead.wait()
    assert before == pytest.approx(_reference_sum(policy, ref, 0))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.5)
    ahead.refresh(policy)
    ahead.start(1)
    assert ahead.wait() == before
    ahead.refresh(policy, ref)
    ahead.start(2)
    assert ahead.wait() == pytest.approx(_reference_sum(policy, ref, 0)) != before
    ahead.close()


def test_ctrl_c_leaves_the_sampling_process_to_the_trainer(mcfg):
    """Ctrl-C signals the whole process group; the trainer stops cleanly with the batch in flight, so the sampling
    process must finish that batch instead of dying of it."""
    ahead = Ahead(GPT(mcfg), GPT(mcfg), _pid_after)
    ahead.start(0)
    worker = ahead.wait()
    ahead.start(5)
    time.sleep(0.1)
    os.kill(worker, signal.SIGINT)
    try:
        finished = ahead.wait()
    except KeyboardInterrupt:  # what a worker that dies of it sends back: a failure, not pytest's own interrupt
        finished = None
    assert finished == worker
    ahead.close()


def test_dpo_generates_ahead_and_close_gives_the_threads_back(tok, mcfg):
    model, ref = _models(mcfg)
    threads = torch.get_num_threads()
    obj = _objective(DPO, tok, ref, generate_ahead=True)
    for _ in range(2):
        batch = obj.next_batch(model)
        loss, parts = obj.loss(model, batch)
        assert math.isfinite(loss.item()) and "time/rollout_wait_s" in parts
        assert batch.chosen  # (this seed's batches have pairs) whose reference log-probs the sampling process scored
        with torch.no_grad():
            assert torch.allclose(batch.ref_logp, sequence_logprobs(ref, batch.packed, 1.0), atol=1e-5)
        assert torch.get_num_threads() == max(1, threads // 2)  # the trainer's half; the sampling thread has the other
    obj.close()
    assert torch.get_num_threads() == threads
    state = obj.state_dict()  # the batch that was in flight at close is kept, so a checkpoint still resumes onto it
    assert state["ahead"]["index"] == 2 and state["rollouts"] == 3


def test_groups_without_reward_variance_are_dropped_and_counted(tok, mcfg):
    model, ref = _models(mcfg)
    obj = _objective(GRPO, tok, ref, env=ConstantEnv())
    batch = obj.next_batch(model)
    loss, parts = obj.loss(model, batch)
    assert parts["rl/groups_dropped"] == 3 and parts["rl/frac_reward_zero_std"] == 1.0 and loss.item() == 0.0


def test_each_torchrun_rank_draws_its_own_problems_and_samples(tok, mcfg):
    model, ref = _models(mcfg)
    single, rank0, rank1 = (_objective(GRPO, tok, ref, rank=r, prompts_per_step=8) for r in (0, 0, 1))
    assert single.problems(5) == rank0.problems(5) != rank1.problems(5)  # rank 0 is a single process
    assert len({rank0.batch_seed(i) for i in range(100)} | {rank1.batch_seed(i) for i in range(100)}) == 200
    problems = rank0.problems(0)
    rank1.problems = lambda index: problems  # the same prompts: the samples still differ
    assert rank0.rollout(model).completions != rank1.rollout(model).completions


def test_truncated_completions_are_masked(tok, mcfg):
    _, ref = _models(mcfg)
    obj = _objective(GRPO, tok, ref, drop_zero_std=False, max_new_tokens=3, prompts_per_step=1)
    problems = obj.problems(0)
    a, b = tok.encode("ab")
    completions = [[a, b, tok.end_id], [a, a, a], [b, tok.end_id], [b, b, b]]
    truncated = [False, True, False, True]
    prompts = [prompt_tokens(obj.env, p, tok) for p in problems]
    sampled, logprobs = [[True] * len(c) for c in completions], [[0.0] * len(c) for c in completions]
    batch = obj._prepare(obj.scored(problems, prompts, completions, sampled, logprobs, truncated, 0.0, 0))
    assert batch.packed.mask.sum(1).tolist() == [3, 0, 2, 0]


# ---- DPO ---------------------------------------------------------------------------------------


def test_preference_pairs_take_the_best_and_worst_of_each_group():
    rewards = torch.tensor([0.0, 1.1, 0.1, 1.1, 1.0, 1.0, 1.0, 1.0, 0.1, 0.0, 0.0, 0.0])
    assert preference_pairs(rewards, 4) == ([1, 8], [0, 9])  # ties resolve to the first; the flat group gives no pair
    assert preference_pairs(torch.tensor([0.0, 0.1, 1.1, 0.0]), 2) == ([1, 2], [0, 3])


def test_dpo_step(tok, mcfg):
    model, ref = _models(mcfg)
    obj = _objective(DPO, tok, ref)
    batch = obj.next_batch(model)
    assert batch.chosen, "the fake environment should give at least one pair"
    loss, parts = obj.loss(model, batch)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: every margin is 0
    assert parts["rl/dpo/margin"] == pytest.approx(0.0, abs=1e-6) and parts["rl/dpo/pairs"] == len(batch.chosen)
    assert model.wte.weight.grad.abs().sum() > 0
    roles = [r["pair"] for r in batch.records()]
    assert roles.count("chosen") == roles.count("rejected") == len(batch.chosen)


# ---- reward-hacking detectors ------------------------------------------------------------------


def _healthy(step: int) -> dict[str, float]:
    return {
        "rl/reward/correct": 0.3 + 0.004 * step,
        "rl/reward/format": 0.9,
        "rl/completion_len_mean": 4.0 + 0.1 * (step % 3),
        "rl/truncated_ratio": 0.02,
        "rl/repeat_rate": 0.01,
        "rl/kl_ref": 0.01 + 0.0005 * step,
        "rl/frac_reward_zero_std": 0.3,
    }


def _run(detectors: HackingDetectors, steps: int, change=None) -> list[tuple[int, str]]:
    fired = []
    for step in range(steps):
        metrics = _healthy(step) | (change(step) if change and step >= 30 else {})
        fired += [(step, name) for name, _ in detectors.update(metrics)]
    return fired


def test_detectors_stay_quiet_on_a_healthy_run():
    assert _run(HackingDetectors(window=10), 100) == []


@pytest.mark.parametrize(
    "detector, change",
    [
        ("format_over_correct", lambda s: {"rl/reward/format": 1.0, "rl/reward/correct": 0.2}),
        ("length_collapse", lambda s: {"rl/completion_len_mean": 1.0}),
        ("length_cap", lambda s: {"rl/truncated_ratio": 0.7}),
        ("repetition", lambda s: {"rl/repeat_rate": 0.5}),
        ("kl_runaway", lambda s: {"rl/kl_ref": 0.1 * (s - 25)}),
        ("no_signal", lambda s: {"rl/frac_reward_zero_std": 0.95}),
    ],
)
def test_each_detector_fires_once_on_its_failure(detector, change):
    fired = _run(HackingDetectors(window=10), 80, change)
    assert [name for _, name in fired] == [detector]
    assert 30 <= fired[0][0] < 50


def test_a_detector_fires_again_after_recovering():
    det = HackingDetectors(window=5)
    bad = {"rl/truncated_ratio": 0.9}
    good = {"rl/truncated_ratio": 0.0}
    fired = [n for i in range(50) for n, _ in det.update(bad if i < 10 or i >= 30 else good)]  # 20 steps healthy
    assert fired == ["length_cap", "length_cap"]
    det = HackingDetectors(window=5)
    fired = [n for i in range(40) for n, _ in det.update(bad if i < 10 or i >= 20 else good)]  # 10: too short
    assert fired == ["length_cap"]


def test_a_single_outlying_step_is_not_a_trend():
    det = HackingDetectors(window=10)
    kl = [0.3] * 25 + [4.5] + [0.3] * 24  # one batch far off the reference, as in a real run at step 473
    assert [n for v in kl for n, _ in det.update({"rl/kl_ref": v})] == []


def test_a_flickering_condition_warns_once():
    det = HackingDetectors(window=5)
    values = [0.0] * 5 + [0.9, 0.9, 0.2, 0.2] * 10  # the windowed median flips across the 0.5 threshold
    steps_true = 0
    fired = []
    for v in values:
        fired += [n for n, _ in det.update({"rl/truncated_ratio": v})]
        steps_true += det._length_cap() is not None
    assert fired == ["length_cap"] and steps_true > 10  # true on many steps, warned once


def test_repeat_rate():
    assert repeat_rate([1, 2, 3, 4, 5]) == 0.0
    assert repeat_rate([7] * 10) == pytest.approx(7 / 8)
    assert repeat_rate([1, 2]) == 0.0


# ---- the stage and the command, end to end -----------------------------------------------------


def _chat_run(path: Path, tok: Tokenizer, mcfg: ModelConfig) -> RunDir:
    """What `glasslab sft` leaves behind: tokenizer, config and an SFT checkpoint (here of a random model)."""
    run = RunDir.create(path)
    tok.save(run.tokenizer_path)
    save_config(run, build_config({"model": mcfg.model_dump()}))
    model, _ = _models(mcfg)
    save_checkpoint(
        run.checkpoints_dir,
        "sft",
        10,
        model=model.state_dict(),
        optimizer={},
        extra={"arch": mcfg.model_dump()},
        rng={"torch_cpu": torch.get_rng_state()},
        keep_last=1,
    )
    return run


RL_SETTINGS = {
    "env": f"{__name__}:FakeEnv",
    "group_size": 4,
    "prompts_per_step": 3,
    "max_new_tokens": 8,
    "eval_n": 6,
    "table_every": 2,
    "ref_reset_every": 2,
    "detect_window": 2,
    "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 2, "lr": 1e-3, "warmup_steps": 0},
}


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "generate_ahead"])
def test_rl_stage_end_to_end_and_resume(tmp_path, tok, mcfg, ahead):
    from glasslab.stages.rl import rl

    run = _chat_run(tmp_path / "chat", tok, mcfg)
    settings = {
        "model": mcfg.model_dump(),
        "rl": RL_SETTINGS | {"generate_ahead": ahead},
        "eval": {"samples": 2, "pass_k": [1, 2]},
        "probes": {"mode": "full"},
        "system": {"threads": 1},
    }
    rl(build_config(settings), run)
    table = read_metrics(run.path, stage="rl").to_pylist()
    steps = {(r["name"], r["step"]) for r in table}
    for name in (
        "rl/reward_mean",
        "rl/kl_ref",
        "rl/entropy",
        "rl/repeat_rate",
        "train/loss",
        "optim/grad_norm",
        "optim/lr",
        "time/generation_s",
        "time/reference_s",
        "time/training_s",
        "throughput/tokens_per_s",
    ):
        assert {(name, s) for s in (1, 2, 3, 4)} <= steps, name
    names = {r["name"] for r in table}
    assert any(n.startswith("attn_entropy/") for n in names) and any(
        n.startswith("grad_norm/") for n in names
    )  # probes
    for name in ("eval/fake/accuracy", "eval/fake/pass@1", "eval/fake/pass@2"):
        assert {(name, 0), (name, 2), (name, 4)} <= steps, name  # step 0: the SFT model, where the curves start
    rows = [json.loads(line) for line in (run.path / "rollouts" / "step-2.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["step"] == 2 and "advantage" in rows[0]
    refs = sorted(p.name for p in (run.checkpoints_dir / "rl").glob("reference-*"))
    assert refs == ["reference-step-0000002.safetensors", "reference-step-0000004.safetensors"]
    assert [s["step"] for s in run.samples()] == [4] * 4
    assert "rl" in run.read_manifest()["stages_done"]

    # resumed for 2 more steps from the checkpoint (and reference) of step 4, the run repeats a straight 6-step run
    longer = build_config(settings | {"rl": settings["rl"] | {"train": RL_SETTINGS["train"] | {"steps": 6}}})
    rl(longer, run)
    straight = _chat_run(tmp_path / "straight", tok, mcfg)
    rl(longer, straight)
    losses = [read_metrics(r.path, names=["train/loss"], stage="rl")["value"].to_pylist() for r in (run, straight)]
    assert len(losses[0]) == 6 and losses[0] == losses[1]


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The real entry point, in process (a subprocess would pay torch's import again)."""
    from glasslab.cli import main

    monkeypatch.setattr(sys, "argv", ["glasslab", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_rl_command(tmp_path, tok, mcfg, monkeypatch, capsys):
    chat = _chat_run(tmp_path / "chat", tok, mcfg)
    sets = [
        "rl.group_size=4",
        "rl.prompts_per_step=2",
        "rl.max_new_tokens=6",
        "rl.eval_n=4",
        "eval.samples=2",
        "eval.pass_k=[1, 2]",
        "rl.train.steps=2",
        "rl.train.eval_every=2",
        'probes.mode="off"',
        "system.threads=1",
    ]
    args = [
        "rl",
        str(chat.path),
        "--preset",
        "smoke",
        "--algo",
        "dpo",
        "--env",
        f"{__name__}:FakeEnv",
        "--runs-dir",
        str(tmp_path),
        "--name",
        "r",
        "--json",
        *[a for s in sets for a in ("--set", s)],
    ]
    code, out, err = _cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert json.loads(out)["status"] == "completed"
    run = RunDir.open(tmp_path / "r")
    manifest = run.read_manifest()
    assert (
        manifest["pipeline"] == ["rl"]
        and manifest["parent"] == str(chat.path)
        and manifest["init"].endswith("step-0000010")
    )
    assert read_metrics(run.path, names=["rl/dpo/pairs"])["step"].to_pylist() == [1, 2]
    assert (run.tokenizer_path).read_text() == chat.tokenizer_path.read_text()
    unknown_env = ["rl", str(chat.path), "--env", "nope", "--name", "x", "--runs-dir", str(tmp_path)]
    for bad in (["rl", str(tmp_path / "nowhere")], unknown_env):
        code, out, err = _cli(monkeypatch, capsys, *bad)
        assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert "unknown task environment 'nope'" in err and not (tmp_path / "x").exists()


def test_rl_env_options_layer_over_the_environment_settings():
    from glasslab.stages.rl import rl_env

    envs = {"arithmetic": {"ops": ["+"], "max_digits": 3}}
    cfg = build_config({"envs": envs, "rl": {"env_options": {"arithmetic": {"min_digits": 2}, "countdown": {"x": 1}}}})
    opts = rl_env(cfg).options
    assert (opts.ops, opts.min_digits, opts.max_digits) == (["+"], 2, 3)
    assert (
        rl_env(build_config({"rl": {"env": "calculator", "env_options": cfg.rl.env_options}})).options.min_digits == 3
    )
    with pytest.raises(GlasslabError, match="unknown option 'digits'"):
        rl_env(build_config({"rl": {"env_options": {"arithmetic": {"digits": 2}}}}))


def test_retention_evaluates_what_rl_env_options_changed_at_the_sft_options():
    from glasslab.stages.rl import retention_envs

    envs = {"arithmetic": {"max_digits": 3, "level_weights": {"3": 0.2}}}
    rl = {"env": {"countdown": 1, "arithmetic": 1}, "env_options": {"arithmetic": {"min_digits": 3}}}
    [(task, env)] = retention_envs(build_config({"envs": envs, "rl": rl}))  # countdown is unchanged: not evaluated
    assert task == "arithmetic@sft" and (env.options.min_digits, env.options.max_digits) == (1, 3)
    assert {p.difficulty for p in env.problems("eval", 200, seed=0)} == {1, 2, 3}  # SFT's problems, not RL's
    assert retention_envs(build_config({"envs": envs, "rl": rl | {"retention_eval": False}})) == []
    assert retention_envs(build_config({"envs": envs, "rl": {"env": "arithmetic"}})) == []


def test_retention_metrics_are_greedy_and_named_by_task(tok, mcfg):
    model, ref = _models(mcfg)
    cfg = RLConfig(group_size=4, prompts_per_step=3, max_new_tokens=8, eval_n=4)
    objective = GRPO(
        FakeEnv(), tok, ref, cfg, build_config({}).eval, seed=0, device=CPU, retention=[("loud@sft", LoudEnv())]
    )
    metrics = objective.evaluate(model)
    assert metrics["eval/loud@sft/accuracy"] == 1.0 and "eval/fake/accuracy" in metrics
    assert "eval/fake/pass@1" in metrics and not any(n.startswith("eval/loud@sft/pass@") for n in metrics)


class LoudEnv(ConstantEnv):
    """A second task for mixtures: `shout abc`, always right."""

    name = "loud"

    def sample_problem(self, rng: random.Random) -> Problem:
        return replace(super().sample_problem(rng), prompt=f"SAY {rng.choice(LETTERS)}{rng.randrange(1000)}")


def test_grpo_on_a_mixture_trains_on_both_and_evaluates_each(tok, mcfg):
    model, ref = _models(mcfg)
    mix = Mixture({"fake": FakeEnv(), "loud": LoudEnv()}, {"fake": 1.0, "loud": 1.0})
    objective = _objective(GRPO, tok, ref, env=mix, prompts_per_step=8)
    batch = objective.next_batch(model)
    kinds = {p.meta["env"] for p in batch.rollout.problems}
    assert kinds == {"fake", "loud"}
    for p, score in zip(batch.rollout.problems, batch.rollout.scores["correct"]):
        assert p.meta["env"] == "fake" or score == 1.0  # each row is scored by its own task
    metrics = objective.evaluate(model)
    assert {"eval/fake/accuracy", "eval/loud/accuracy"} <= set(metrics) and metrics["eval/loud/accuracy"] == 1.0
