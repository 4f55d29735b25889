"""Data mixtures: scheduled domain weights, the row sampler, per-domain validation, generated sources, and the
router probe's domain x expert load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from glasslab.config import MixtureConfig, ModelConfig, MoEConfig, TrainConfig, build_config, resolve
from glasslab.data.mixture import MixtureSampler, arithmetic_documents, weights_at
from glasslab.data.tokenizer import Tokenizer
from glasslab.data.tokens import TokenSplits
from glasslab.errors import GlasslabError
from glasslab.model.gpt import GPT
from glasslab.objectives.mixture import MixtureLanguageModeling
from glasslab.probes.router import PREFIX, RouterProbe
from glasslab.report.rundata import RunData, Series
from glasslab.study.aggregate import metric_value
from glasslab.study.plan import expand
from glasslab.study.spec import MetricSpec, load_spec
from glasslab.track.metrics import MetricStore, last_values
from glasslab.track.rundir import RunDir
from glasslab.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

SHIFT = MixtureConfig(
    sources={"prose": "shakespeare", "sums": "synthetic:arithmetic"},
    weights={"sums": 0},
    schedule=[{"at": 0.2, "weights": {"prose": 1, "sums": 1}}, {"step": 4, "weights": {"sums": 3}}],
)


def test_weights_follow_the_schedule():
    assert weights_at(SHIFT, 0, 10).tolist() == [1.0, 0.0] == weights_at(SHIFT, 1, 10).tolist()
    assert weights_at(SHIFT, 2, 10).tolist() == [0.5, 0.5] == weights_at(SHIFT, 3, 10).tolist()  # at 0.2 of 10
    assert weights_at(SHIFT, 4, 10).tolist() == [0.0, 1.0]  # a domain a schedule entry leaves out gets 0
    assert weights_at(SHIFT, 3, 20).tolist() == [1.0, 0.0]  # 0.2 of 20 steps: the shift comes at step 4


def test_mixture_config_errors_name_the_problem():
    with pytest.raises(GlasslabError, match="not in sources"):
        resolve("smoke", overrides=['data.mixture.sources={a = "shakespeare"}', "data.mixture.weights={b = 1}"])
    with pytest.raises(GlasslabError, match="exactly one of step"):
        resolve(
            "smoke",
            overrides=['data.mixture.sources={a = "shakespeare"}', "data.mixture.schedule=[{weights = {a = 1}}]"],
        )
    with pytest.raises(GlasslabError, match="increasing"):
        resolve(
            "smoke",
            overrides=[
                'data.mixture.sources={a = "shakespeare"}',
                "data.mixture.schedule=[{step = 5, weights = {a = 1}}, {step = 2, weights = {a = 1}}]",
            ],
        )


def test_sampler_rows_come_from_the_scheduled_domains_and_resume():
    tokens = {"prose": np.full(100, 1, dtype=np.uint16), "sums": np.full(100, 2, dtype=np.uint16)}
    sampler = MixtureSampler(tokens, SHIFT, batch_size=64, block_size=8, seed=0, total_steps=10)
    firsts = [sampler.next_batch()[0][:, 0] for _ in range(5)]
    assert (firsts[0] == 1).all() and (firsts[1] == 1).all()
    assert 16 < int((firsts[2] == 2).sum()) < 48  # half and half, give or take
    assert (firsts[4] == 2).all()
    state = sampler.state_dict()
    expected = sampler.next_batch()
    resumed = MixtureSampler(tokens, SHIFT, batch_size=64, block_size=8, seed=9, total_steps=10)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), expected))


def test_arithmetic_text_is_deterministic_and_correct():
    docs = arithmetic_documents(seed=3, n_docs=2, lines=5)
    assert docs == arithmetic_documents(seed=3, n_docs=2, lines=5) and len(docs) == 2
    for line in docs[0].splitlines():
        left, right = line.split(" = ")
        assert eval(left) == int(right)  # noqa: S307 - our own generated text


def objective() -> MixtureLanguageModeling:
    texts = {"prose": "the quick brown fox jumps over the lazy dog. " * 40, "sums": "".join(arithmetic_documents(0, 4))}
    tok = Tokenizer.train(list(texts.values()), "char", 0)
    splits = {}
    for domain, text in texts.items():
        ids = np.array(tok.encode(text), dtype=np.uint16)
        cut = int(len(ids) * 0.8)
        splits[domain] = TokenSplits(train=ids[:cut], val=ids[cut:])
    return MixtureLanguageModeling(
        splits,
        tok,
        mixture=SHIFT,
        batch_size=4,
        block_size=16,
        eval_batches_n=2,
        z_loss=0.0,
        seed=0,
        device=torch.device("cpu"),
        total_steps=10,
    )


def test_validation_per_domain_and_the_router_load_by_domain(tmp_path):
    obj = objective()
    assert obj.val_domains() == ["prose", "prose", "sums", "sums"] and obj.probe_inputs().shape == (8, 16)
    torch.manual_seed(0)
    moe = MoEConfig(n_experts=4, top_k=1)
    model = GPT(
        ModelConfig(vocab_size=obj.tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=16, moe=moe)
    )
    metrics = obj.evaluate(model)
    assert metrics["val/loss"] == pytest.approx((metrics["val/prose/loss"] + metrics["val/sums/loss"]) / 2)
    run = RunDir.create(tmp_path / "run")
    cfg = TrainConfig(steps=2, warmup_steps=0, eval_every=2, checkpoint_every=100, batch_size=4)
    with MetricStore(run.metrics_db_path) as store:
        train(model, obj, cfg, run, store, arch={}, hooks=[RouterProbe(1, 0, 10)])
        m = last_values(store.read())
    for domain in ("prose", "sums"):
        shares = [m[f"{PREFIX}domain_load/{domain}/blocks.0.e{k}"] for k in range(4)]
        assert sum(shares) == pytest.approx(1.0)
    assert "val/sums/bpb" in m and f"{PREFIX}eval_maxvio/blocks.0" in m


# ---- the moe-balance study's measurements --------------------------------------------------------


def test_study_window_and_recovery_against_a_hand_computation():
    steps = np.arange(10, 101, 10)
    values = np.array([1.0, 0.9, 0.8, 0.7, 0.6, 0.9, 0.6, 0.4, 0.2, 0.1])
    run = RunData(Path("r"), {}, {}, "", {"pretrain": {"moe/maxvio": Series(steps, values, steps.astype(float))}})

    def value(**kw) -> float:
        return metric_value(run, MetricSpec(name="moe/maxvio", **kw), "pretrain")

    assert value(reduce="mean", window=(0.3, 0.5)) == pytest.approx((0.8 + 0.7) / 2)  # steps 30, 40
    assert value(reduce="mean", window=(0.8, 1.0)) == pytest.approx((0.4 + 0.2 + 0.1) / 3)  # 80..100, end included
    assert value(reduce="recovery", window=(0.5, 1.0), threshold=0.3) == 40  # from step 50 to 90
    assert value(reduce="recovery", window=(0.5, 1.0), threshold=0.05) == 50  # never: the window's length
    with pytest.raises(ValueError, match="threshold"):
        MetricSpec(name="x", reduce="recovery")


def test_the_moe_balance_study_crosses_the_balancing_methods_and_keeps_the_shift_at_half():
    plan = expand(load_spec("moe-balance"), scale=0.5)
    assert len(plan.runs) == 12 and plan.levels("aux_loss") == [0.0, 0.01] and plan.levels("bias_rate") == [0.0, 0.001]
    cfg = resolve("tiny-moe", overrides=plan.runs[-1].sets)
    assert cfg.train.steps == 120 and cfg.model.moe.aux_loss == 0.01 and cfg.model.moe.bias_rate == 0.001
    assert weights_at(cfg.data.mixture, 59, 120).tolist() == [1.0, 0.0]
    assert weights_at(cfg.data.mixture, 60, 120).tolist() == [0.5, 0.5]


def test_a_config_with_a_schedule_round_trips_through_toml():
    cfg = resolve(
        "smoke",
        overrides=['data.mixture.sources={a = "shakespeare"}', "data.mixture.schedule=[{at = 0.5, weights = {a = 1}}]"],
    )
    assert build_config(tomllib.loads(cfg.to_toml())) == cfg
