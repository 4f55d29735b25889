"""A run killed after a checkpoint and resumed logs what the uninterrupted run logs: every metric at every step
(wall-clock time and throughput aside), every event and every sample, with every probe on, for pretraining, SFT and GRPO
(sampling in the trainer, and ahead in a second process)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from test_rl import LETTERS, RL_SETTINGS, _chat_run
from test_sft import base_run, small_config

from glasslab.config import ModelConfig, ProbesConfig, build_config, resolve
from glasslab.data.tokenizer import Tokenizer
from glasslab.stages.pretrain import pretrain
from glasslab.stages.rl import rl
from glasslab.stages.sft import sft
from glasslab.track.metrics import read_metrics
from glasslab.track.rundir import RunDir
from glasslab.train.loop import Hook, StepContext

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread

# Spike scores start once a window holds half its steps, so they are logged on both sides of the checkpoint; a
# short history lets the dossier after the resume look back past it for departures.
# a short window, no warm-up skip, a low threshold and one quiet step to end an episode: the few steps here hold
# spikes on both sides of the checkpoint
PROBES = {
    "mode": "full",
    "spike_window": 8,
    "spike_history": 2,
    "spike_skip_warmup": False,
    "spike_quiet": 1,
    "spike_grad_threshold": 3.0,
}
STEPS, CHECKPOINT, KILLED_AT = 12, 6, 8  # killed two steps after the step-6 checkpoint
JOLTS = (6, 7, 11)  # gradient spikes: one under way across the checkpoint, one after the resume
# Timings, and which process happened to be free first to score a batch under the reference when generating ahead
# (rl/ahead.py: the values are the same either way; the flag differs between two uninterrupted runs too).
WALL_CLOCK = ("time/", "throughput/", "rl/reference_scored_ahead")


class Killed(Exception):
    """Stands for SIGKILL."""


class Jolt(Hook):
    """Scales the gradients of the JOLTS steps 1000-fold: gradient-norm spikes where the test needs them."""

    order = -100  # stands for the step itself: before the probes read the gradients

    def on_backward(self, ctx: StepContext) -> None:
        if ctx.step + 1 in JOLTS:
            for p in ctx.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(1000.0)


class Kill(Hook):
    """Raises when step `at` is done: by then the run has logged the metrics and events of the steps after its
    last checkpoint, which is the most a run killed with SIGKILL leaves behind."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_start(self, ctx: StepContext) -> None:
        if ctx.step == self.at:
            raise Killed


def metrics(run: RunDir, stage: str) -> list[tuple[int, str, str]]:
    """Every logged (step, name, value), repr'd so that NaN equals NaN; rows logged twice stay twice."""
    rows = read_metrics(run.path, stage=stage).to_pylist()
    return sorted((r["step"], r["name"], repr(r["value"])) for r in rows if not r["name"].startswith(WALL_CLOCK))


def events(run: RunDir) -> list[dict]:
    """The events without their time, with the run's own path (in dossier paths) made neutral."""
    return [
        json.loads(json.dumps({k: v for k, v in e.items() if k != "time"}).replace(str(run.path), "RUN"))
        for e in run.events()
    ]


def assert_resume_is_exact(stage: Callable, cfg, straight: RunDir, broken: RunDir, name: str) -> None:
    stage(cfg, straight, hooks=[Jolt()])
    with pytest.raises(Killed):
        stage(cfg, broken, hooks=[Jolt(), Kill(KILLED_AT)])
    assert broken.read_manifest()["last_step"] == CHECKPOINT  # what the killed run left: checkpoint 6, logs to 8
    assert max(step for step, _, _ in metrics(broken, name)) == KILLED_AT
    assert max(s["step"] for s in broken.samples()) == KILLED_AT
    stage(cfg, broken, hooks=[Jolt()])

    expected, got = metrics(straight, name), metrics(broken, name)
    assert len(got) == len(expected)
    for want, have in zip(expected, got):
        assert have == want
    assert events(broken) == events(straight)
    assert broken.samples() == straight.samples()
    # the comparison covers what only restored hook state gets right: spike scores right after the resume (an
    # empty window scores nothing for 4 steps), spikes before the checkpoint (one under way across it gives no
    # second dossier) and after the resume (its dossier's history reaches back before it)
    scored = {step for step, n, _ in expected if n == "spike/grad_norm_score"}
    assert any(CHECKPOINT < s <= CHECKPOINT + PROBES["spike_window"] // 2 for s in scored) and STEPS in scored
    spikes = [e["step"] for e in events(straight) if e["kind"] == "spike"]
    assert spikes and min(spikes) <= CHECKPOINT and max(spikes) > KILLED_AT


def test_pretraining_resumes_exactly(tmp_path: Path) -> None:
    sets = [
        f"train.steps={STEPS}",
        f"train.checkpoint_every={CHECKPOINT}",
        "train.eval_every=4",
        "train.sample_every=4",
        "train.warmup_steps=2",
        "tokenizer.kind=char",
        "data.max_chars=20000",
        "system.threads=1",
        *(f"probes.{k}={v!r}".replace("'", '"') for k, v in PROBES.items()),
    ]
    cfg = resolve("smoke", overrides=sets)
    straight, broken = RunDir.create(tmp_path / "straight"), RunDir.create(tmp_path / "broken")
    assert_resume_is_exact(pretrain, cfg, straight, broken, "pretrain")


def test_sft_resumes_exactly(tmp_path: Path) -> None:
    tok = Tokenizer.train(["0123456789+-*/=() Reach with Use the calculator. error: Paris. Be brief."], "char", 0)
    cfg = small_config(tok, examples=128)
    cfg.sft.train.steps, cfg.sft.train.checkpoint_every, cfg.sft.train.eval_every = STEPS, CHECKPOINT, 4
    cfg.sft.train.sample_every = 4
    cfg.probes = ProbesConfig(**PROBES)
    assert_resume_is_exact(sft, cfg, base_run(tmp_path / "straight", tok), base_run(tmp_path / "broken", tok), "sft")


@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "generate_ahead"])
def test_grpo_resumes_exactly(tmp_path: Path, ahead: bool) -> None:
    tok = Tokenizer.train([f"say {LETTERS} {LETTERS.upper()} 0123456789 .,!?\n" * 4], "char", 0)
    mcfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64)
    train = RL_SETTINGS["train"] | {"steps": STEPS, "checkpoint_every": CHECKPOINT, "eval_every": 4, "sample_every": 4}
    settings = {
        "model": mcfg.model_dump(),
        "rl": RL_SETTINGS | {"generate_ahead": ahead, "train": train},
        "eval": {"samples": 2, "pass_k": [1, 2]},
        "probes": PROBES,
        "system": {"threads": 1},
    }
    runs = [_chat_run(tmp_path / name, tok, mcfg) for name in ("straight", "broken")]
    assert_resume_is_exact(rl, build_config(settings), *runs, "rl")
