"""Tests for seeing where the time goes: model FLOPs per token, the cached peak, MFU in the metrics, `--profile`,
and when `system.compile = "auto"` compiles."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from glasslab.config import ModelConfig, SystemConfig, TrainConfig
from glasslab.data.tokenizer import Tokenizer
from glasslab.data.tokens import TokenSplits
from glasslab.model.gpt import GPT
from glasslab.objectives.lm import LanguageModeling
from glasslab.probes.forward import ForwardProbe
from glasslab.probes.grads import GradProbe
from glasslab.probes.view import probe_summary
from glasslab.report import build_report
from glasslab.track.layout import PROFILE_SUMMARY, PROFILE_TRACE
from glasslab.track.metrics import MetricStore, last_values
from glasslab.track.rundir import RunDir
from glasslab.train import compiling, mfu
from glasslab.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 60


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], "char", 0)


def objective_for(tok: Tokenizer, block: int = 32) -> LanguageModeling:
    ids = np.array(tok.encode(TEXT), dtype=np.uint16)
    cut = int(len(ids) * 0.9)
    return LanguageModeling(
        TokenSplits(train=ids[:cut], val=ids[cut:]),
        tok,
        batch_size=4,
        block_size=block,
        eval_batches_n=1,
        z_loss=0.0,
        seed=0,
        device=torch.device("cpu"),
        sample_tokens=4,
    )


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_is_six_n_plus_attention_by_hand(tied):
    V, L, C, H, T, hidden = 61, 2, 32, 4, 16, 4 * 32
    model = GPT(ModelConfig(vocab_size=V, n_layer=L, n_head=H, n_embd=C, block_size=T, tie_embeddings=tied))
    per_block = 4 * C * C + 2 * C * hidden + 2 * C + 2 * (C // H)  # q k v o, up down, two norms, q/k norms
    n = L * per_block + C + V * C  # final norm; the head (the embedding table itself when tied)
    assert mfu.flops_per_token(model) == 6 * n + 12 * L * H * (C // H) * T


def test_the_peak_is_measured_once_per_key_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GLASSLAB_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(mfu, "measure_peak", lambda device, dtype: calls.append(dtype) or 1e9 * (len(calls)))
    monkeypatch.setattr(mfu, "quiet_cpu", lambda: True)
    cpu = torch.device("cpu")
    assert mfu.peak_flops(cpu, torch.float32) == 1e9
    assert mfu.peak_flops(cpu, torch.float32) == 1e9  # from the file
    assert mfu.peak_flops(cpu, torch.bfloat16) == 2e9  # another dtype, another measurement
    assert calls == [torch.float32, torch.bfloat16]
    cached = json.loads((tmp_path / mfu.PEAK_FILE).read_text())
    assert len(cached) == 2 and all(f"threads={torch.get_num_threads()}" in k for k in cached)


def test_a_peak_measured_on_a_busy_machine_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("GLASSLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(mfu, "measure_peak", lambda device, dtype: 5e8)
    monkeypatch.setattr(mfu, "quiet_cpu", lambda: False)
    assert mfu.peak_flops(torch.device("cpu"), torch.float32) == 5e8
    assert not (tmp_path / mfu.PEAK_FILE).exists()


def test_the_measured_peak_is_a_matmul_rate():
    flops = mfu.measure_peak(torch.device("cpu"), torch.float32, n=128, reps=2)
    assert 1e6 < flops < 1e15


def test_mfu_is_logged_as_model_flops_over_the_peak(tmp_path, tok, monkeypatch):
    monkeypatch.setattr("glasslab.train.loop.peak_flops", lambda device, dtype: 1e9)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=32))
    run = RunDir.create(tmp_path / "run")
    cfg = TrainConfig(steps=3, batch_size=4, warmup_steps=0, eval_every=0, checkpoint_every=1000)
    with MetricStore(run.metrics_db_path) as store:
        train(model, objective_for(tok), cfg, run, store, arch={}, system=SystemConfig(compile=False))
        values = last_values(store.read())
    expected = values["throughput/tokens_per_s"] * mfu.flops_per_token(model)
    assert values["throughput/model_flops_per_s"] == pytest.approx(expected)
    assert values["throughput/mfu"] == pytest.approx(expected / 1e9)


def test_profile_writes_a_trace_and_time_by_part(tmp_path, tok):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=32))
    run = RunDir.create(tmp_path / "run")
    cfg = TrainConfig(steps=6, batch_size=4, warmup_steps=0, eval_every=0, checkpoint_every=1000)
    hooks = [GradProbe(every=1), ForwardProbe(attention_every=1, activations_every=1)]
    with MetricStore(run.metrics_db_path) as store:
        train(model, objective_for(tok), cfg, run, store, arch={}, hooks=hooks, system=SystemConfig(profile=2))
    out = run.profile_dir("pretrain")
    trace = json.loads((out / PROFILE_TRACE).read_text())
    assert any(e.get("name") == "glasslab/backward" for e in trace["traceEvents"])
    summary = json.loads((out / PROFILE_SUMMARY).read_text())
    assert summary["steps"] == 2 and not summary["compiled"]
    parts = summary["parts"]
    expected = {"embedding", "attention", "mlp", "head_and_loss", "data", "backward", "clip", "optimizer", "log"}
    assert expected | {"hook/GradProbe", "hook/ForwardProbe", "other"} <= set(parts)
    assert all(p["ms_per_step"] >= 0 for p in parts.values())
    # the parts tile the step: their sum is the step's time (`other` is what lies between them)
    assert sum(p["share"] for p in parts.values()) == pytest.approx(1.0, abs=0.02)
    # the probe's own forward is not counted as the training forward's attention and MLP
    assert parts["attention"]["ms_per_step"] < summary["step_ms"]
    assert summary["top_ops"] and all(not o["op"].startswith("glasslab/") for o in summary["top_ops"])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert run.read_profiles() == {"pretrain": summary}
    assert probe_summary(run.path)["profile"]["pretrain"] == summary
    html = build_report(run.path).read_text()
    assert "Where the time goes" in html and "head_and_loss" in html


def test_cli_profile_flag_sets_system_profile(tmp_path, monkeypatch):
    import glasslab.stages.pretrain
    from glasslab.cli import app

    seen = {}
    monkeypatch.setattr(glasslab.stages.pretrain, "pretrain", lambda cfg, run, **kw: seen.update(p=cfg.system.profile))
    args = ["pretrain", "--preset", "smoke", "--runs-dir", str(tmp_path), "--name", "r", "--profile", "5"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen["p"] == 5


def test_auto_compiles_long_static_shape_stages_only(tok, monkeypatch):
    lm, cold = objective_for(tok), compiling.CPU_MIN_STEPS

    class Varying:
        stage = "rl"

    monkeypatch.setattr(compiling, "has_cxx", lambda: True)
    assert compiling.should_compile("auto", lm, "cpu", cold)
    assert not compiling.should_compile("auto", lm, "cpu", cold - 1)
    assert not compiling.should_compile("auto", Varying(), "cpu", 10 * cold)
    assert compiling.should_compile("auto", lm, "cuda", 1)
    assert not compiling.should_compile("auto", Varying(), "cuda", 10 * cold)
    assert compiling.should_compile(True, Varying(), "cpu", 1)
    assert not compiling.should_compile(False, lm, "cuda", 10 * cold)
    monkeypatch.setattr(compiling, "has_cxx", lambda: False)
    assert not compiling.should_compile("auto", lm, "cpu", 10 * cold)
