"""The evaluation engine: pass@k, aggregation, batching, and tool calls through generation."""

import itertools
import math

import pytest
import torch

import glasslab.train.evaluate as evaluate
from glasslab.config import ModelConfig
from glasslab.data.tokenizer import Tokenizer
from glasslab.envs import get_env
from glasslab.errors import GlasslabError
from glasslab.model.generate import Generation
from glasslab.model.gpt import GPT
from glasslab.stages.common import choose_checkpoint
from glasslab.track.rundir import RunDir
from glasslab.train.evaluate import completion_text, evaluate_env, pass_at_k, prompt_tokens


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["0123456789+-*/=() Reach with Use the calculator. error: not arithmetic"], "char", 0)


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def test_pass_at_k_matches_brute_force():
    """The unbiased estimator equals the share of k-subsets of the n samples holding a correct one."""
    for n, c, k in [(4, 0, 1), (4, 1, 1), (4, 1, 4), (5, 2, 2), (6, 3, 4), (8, 8, 3)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        assert math.isclose(pass_at_k(n, c, k), sum(any(s) for s in subsets) / len(subsets))


def test_prompt_is_system_then_user_ending_with_the_assistant_header(tok):
    env = get_env("calculator")
    p = env.problems("eval", 1, 0)[0]
    text = tok.decode(prompt_tokens(env, p, tok))
    assert text == f"<|bos|><|system|>Use the calculator.<|end|><|user|>{p.prompt}<|end|><|assistant|>"
    assert completion_text(tok, tok.encode("12<|end|>")) == "12<|end|>"


def fake_generate(answer_for):
    """A stand-in for `generate` that answers each prompt with answer_for(prompt text, row)."""

    def generate(model, prompts, max_new_tokens, *, temperature, seed, **kw):
        tok = model.tok
        rows = [tok.encode(answer_for(tok.decode(p), temperature, r)) for r, p in enumerate(prompts)]
        return Generation(rows, [[True] * len(t) for t in rows], [[0.0] * len(t) for t in rows], [False] * len(rows))

    return generate


def test_aggregates_accuracy_pass_at_k_difficulty_and_rewards(tok, monkeypatch):
    """Greedy: right on 1-digit problems only; sampled: one right answer in four, on every problem."""
    env = get_env("arithmetic", {"min_digits": 1, "max_digits": 2})
    problems = {p.prompt: p for p in env.problems("eval", 40, seed=3)}

    def answer(prompt, temperature, row):
        p = problems[prompt.split("<|user|>")[1].split("<|end|>")[0]]
        right = (p.difficulty == 1) if temperature == 0 else (row % 4 == 0)
        return (p.answer if right else "x") + "<|end|>"

    model = type("M", (), {"tok": tok})()
    monkeypatch.setattr(evaluate, "generate", fake_generate(answer))
    r = evaluate_env(model, tok, env, n=40, seed=3, pass_k=(1, 2, 4), samples=4, batch_size=8)
    ones = sum(p.difficulty == 1 for p in problems.values())
    assert r.accuracy == pytest.approx(ones / 40)
    assert r.by_difficulty == {1: 1.0, 2: 0.0}
    assert r.rewards == dict.fromkeys(
        ["correct", "digits", "format"], pytest.approx(ones / 40)
    )  # wrong answers are "x"
    assert r.pass_at_k == {1: pytest.approx(0.25), 2: pytest.approx(0.5), 4: pytest.approx(1.0)}
    # each place averages over the problems whose answer has it: only right (1-digit) problems' places are right
    tens = [p for p in problems.values() if int(p.answer) >= 10]
    assert r.diagnostics["place/units"] == pytest.approx(ones / 40)
    assert r.diagnostics["place/tens"] == pytest.approx(sum(p.difficulty == 1 for p in tens) / len(tens))
    assert set(r.as_dict()) == {"task", "n", "seed", "accuracy", "pass_at_k", "by_difficulty", "rewards", "diagnostics"}
    assert r.metrics()["eval/arithmetic/place/units"] == r.diagnostics["place/units"]
    assert {"prompt", "answer", "completion", "rewards", "difficulty"} <= set(r.records[0])
    with pytest.raises(GlasslabError, match="k"):
        evaluate_env(model, tok, env, n=4, seed=3, pass_k=(8,), samples=4)


def test_batched_generation_gives_the_same_greedy_answers(tok):
    """Left padding must not change a row's computation: batch size 1 and 16 agree."""
    env, model = get_env("arithmetic"), tiny_model(tok)
    one = evaluate_env(model, tok, env, n=16, seed=1, samples=0, pass_k=(), max_new_tokens=6, batch_size=1)
    many = evaluate_env(model, tok, env, n=16, seed=1, samples=0, pass_k=(), max_new_tokens=6, batch_size=16)
    assert [r["completion"] for r in one.records] == [r["completion"] for r in many.records]
    assert one.pass_at_k == {}


class ScriptedGPT(GPT):
    """A real GPT (cache, masks) whose logits follow a script: the i-th forward pass puts all mass on
    script[i]. Where generation forces tokens (tool results), the script's choice is ignored."""

    def __init__(self, cfg, script):
        super().__init__(cfg)
        self.script, self.calls = script, 0

    def forward(self, idx, positions=None, mask=None, cache=None):
        logits = super().forward(idx, positions, mask, cache)
        out = torch.full_like(logits, -1e9)
        out[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 0.0
        self.calls += 1
        return out


def test_tool_call_runs_during_evaluation(tok):
    """A model that calls the calculator and copies its result is right, with the tool's result forced."""
    env = get_env("calculator")
    p = env.problems("eval", 1, seed=0)[0]
    expr = p.prompt.removesuffix("=")
    forced = len(tok.encode(f"<|tool|>{p.answer}<|end|><|assistant|>"))
    script = tok.encode(f"<|tool_call|>{expr}<|end|>") + [0] * forced + tok.encode(f"{p.answer}<|end|>")
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=64)
    r = evaluate_env(ScriptedGPT(cfg, script).eval(), tok, env, n=1, seed=0, samples=0, pass_k=(), max_new_tokens=40)
    assert (
        r.records[0]["completion"]
        == f"<|tool_call|>{expr}<|end|><|tool|>{p.answer}<|end|><|assistant|>{p.answer}<|end|>"
    )
    assert r.accuracy == 1.0 and r.rewards["format"] == 1.0


def test_choose_checkpoint_by_stage_and_step_lists_what_the_run_has(tmp_path):
    run = RunDir.create(tmp_path / "run")
    for stage, step in (("pretrain", 10), ("pretrain", 20), ("sft", 5)):
        (run.checkpoints_dir / stage / f"step-{step:07d}").mkdir(parents=True)
        (run.checkpoints_dir / stage / f"step-{step:07d}" / "COMPLETE").write_text("ok\n")
    (run.checkpoints_dir / "sft" / "step-0000009").mkdir()  # an unfinished save: no COMPLETE marker
    assert choose_checkpoint(run).name == "step-0000005"  # the newest of the latest stage
    assert choose_checkpoint(run, "pretrain").name == "step-0000020"
    assert choose_checkpoint(run, "pretrain", 10).name == "step-0000010"
    with pytest.raises(GlasslabError, match="no rl checkpoint: use --stage pretrain or sft"):
        choose_checkpoint(run, "rl")
    with pytest.raises(GlasslabError, match="at step 9: use --step 5"):
        choose_checkpoint(run, "sft", 9)
    with pytest.raises(GlasslabError, match="--stage 'eval' is not a training stage"):
        choose_checkpoint(run, "eval")
