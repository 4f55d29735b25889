"""Run report, compare and plot, on synthetic run directories that cover every metric family."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from glasslab.config import Config
from glasslab.errors import GlasslabError
from glasslab.report import build_report
from glasslab.report.compare import build_compare, compare_summary
from glasslab.report.figures import position_bucket, thin
from glasslab.report.plot import plot_metric
from glasslab.track.metrics import SCHEMA

BLOCKS = 4
HEADS = 2
PARAMS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.proj")


def _rows(stage: str, step: int, values: dict[str, float], t0: float) -> list[tuple]:
    return [(step, stage, name, float(v), t0 + step) for name, v in values.items()]


def make_run(path: Path, *, seed: int = 0, lr: float = 3e-3, qk_norm: bool = True, loss_shift: float = 0.0) -> Path:
    """A finished pretrain -> sft -> rl -> eval run with every metric family and every side file."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    cfg = Config(seed=seed)
    cfg.train.lr, cfg.model.qk_norm, cfg.model.vocab_size = lr, qk_norm, 512
    (path / "config.toml").write_text(cfg.to_toml())
    manifest = {
        "status": "completed",
        "stage": "rl",
        "stages_done": ["pretrain", "sft", "rl"],
        "pipeline": ["pretrain", "sft", "rl"],
        "seed": seed,
        "created": "2026-01-01T00:00:00+00:00",
        "last_step": 40,
        "preset": "tiny",
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    rows: list[tuple] = []
    t0 = 1.7e9
    for step in range(1, 201):
        loss = (
            6.0 * math.exp(-step / 60) + 2.0 + loss_shift + 0.02 * rng.standard_normal() + (1.5 if step == 120 else 0.0)
        )
        rows += _rows(
            "pretrain",
            step,
            {
                "train/loss": loss,
                "train/z_loss": 20 + step / 50,
                "optim/lr": lr * min(1, step / 20),
                "optim/grad_norm": 1.2 - step / 400,
                "optim/clipped": float(step < 30),
                "throughput/tokens_per_s": 30000 + 100 * rng.standard_normal(),
                "time/step_s": 0.07,
            },
            t0,
        )
        if step % 10 == 0:
            fam = {}
            for b in range(BLOCKS):
                fam[f"grad_norm/blocks.{b}"] = 0.5 / (b + 1) + step / 1000
                fam[f"update_ratio/blocks.{b}"] = 1e-3 * (b + 1)
                fam[f"weight_norm/blocks.{b}"] = 10 + step / 100
                fam[f"update_norm/blocks.{b}"] = 0.01
                fam[f"adam_m_norm/blocks.{b}"] = 0.02
                fam[f"adam_v_norm/blocks.{b}"] = 1e-5
                for p in PARAMS:
                    fam[f"grad_norm/blocks.{b}.{p}"] = 0.1 * (b + 1)
                    fam[f"update_ratio/blocks.{b}.{p}"] = 1e-3
            fam["grad_norm/wte"] = 0.3
            rows += _rows("pretrain", step, fam, t0)
        if step % 25 == 0:
            probe = {
                "val/loss": loss + 0.1,
                "val/bpb": (loss + 0.1) / math.log(2) / 3,
                "val/ppl": math.exp(loss + 0.1),
                "logits/max": 5 + step / 20,
                "logits/log_z_mean": 3 + step / 50,
                "custom/thing": step * 2.0,
            }
            for b in range(BLOCKS):
                for h in range(HEADS):
                    collapsed = b == 1 and h == 0 and step > 100
                    probe[f"attn_entropy_norm/blocks.{b}.h{h}"] = 0.05 if collapsed else 0.7
                    probe[f"attn_entropy/blocks.{b}.h{h}"] = 0.2 if collapsed else 2.5
                    probe[f"attn_max_logit/blocks.{b}.h{h}"] = 4 + step / (20 if not qk_norm else 100)
                    probe[f"attn_bos/blocks.{b}.h{h}"] = 0.3
                probe[f"attn_entropy/blocks.{b}"] = 2.0
                probe[f"act_rms/blocks.{b}"] = 1 + b
                probe[f"act_max/blocks.{b}"] = 10 + b
                probe[f"act_kurtosis/blocks.{b}"] = 3 + b
            for lo, hi in ((0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 127)):
                probe[f"loss_by_pos/{lo:03d}-{hi:03d}"] = loss + 1.0 / (1 + lo / 16)
                probe[f"loss_by_pos_ci95/{lo:03d}-{hi:03d}"] = 0.1
            rows += _rows("pretrain", step, probe, t0)
    for step in range(1, 61):
        rows += _rows(
            "sft",
            step,
            {
                "train/loss": 1.5 - step / 100,
                "optim/lr": 1e-3,
                "optim/grad_norm": 0.8,
                "throughput/tokens_per_s": 20000,
                "time/step_s": 0.1,
            },
            t0 + 300,
        )
        if step % 20 == 0:
            rows += _rows("sft", step, {"val/loss": 1.4 - step / 100, "eval/arithmetic/accuracy": step / 100}, t0 + 300)
    for step in range(1, 41):
        rl = {
            "rl/reward_mean": 0.4 + step / 100,
            "rl/reward/correct": 0.4 + step / 100,
            "rl/reward/format": 0.9,
            "rl/reward_std": 0.3,
            "rl/kl_ref": step / 400,
            "rl/kl_old": 0.0,
            "rl/entropy": 0.8,
            "rl/completion_len_mean": 6,
            "rl/completion_len_min": 3,
            "rl/completion_len_max": 12,
            "rl/truncated_ratio": 0.0,
            "rl/clip_ratio_low": 0.0,
            "rl/clip_ratio_high": 0.01,
            "rl/clip_ratio_region": 0.01,
            "rl/frac_reward_zero_std": 0.25,
            "rl/advantage_min": -1.5,
            "rl/advantage_mean": 0.0,
            "rl/advantage_max": 1.5,
            "rl/repeat_rate": 0.02,
            "train/loss": 0.01,
            "time/generation_s": 0.5,
            "time/reference_s": 0.05,
            "time/training_s": 0.1,
            "throughput/tokens_per_s": 900,
            "time/step_s": 0.65,
        }
        rows += _rows("rl", step, rl, t0 + 600)
        if step % 10 == 0:
            rows += _rows(
                "rl", step, {"eval/arithmetic/accuracy": 0.5 + step / 200, "eval/arithmetic/pass@4": 0.8}, t0 + 600
            )
    rows += _rows(
        "eval",
        0,
        {"eval/arithmetic/after_rl/accuracy": 0.7 + loss_shift, "eval/arithmetic/after_rl/pass@4": 0.9},
        t0 + 900,
    )
    columns = list(zip(*rows))
    pq.write_table(pa.table(dict(zip(SCHEMA.names, columns)), schema=SCHEMA), path / "metrics.parquet")

    def jsonl(p: Path, records: list[dict]) -> None:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(r) + "\n" for r in records))

    jsonl(
        path / "samples.jsonl",
        [
            {"stage": "pretrain", "step": 200, "prompt": "\n", "completion": "To be <or> not"},
            {"stage": "rl", "step": 40, "prompt": "12+7=", "completion": "19<|end|>"},
        ],
    )
    jsonl(
        path / "events.jsonl",
        [
            {"time": t0 + 120, "kind": "spike", "message": "loss spike at step 120", "step": 120, "stage": "pretrain"},
            {
                "time": t0 + 630,
                "kind": "hacking",
                "message": "format reward rises while correctness falls",
                "step": 30,
                "stage": "rl",
                "detector": "format_vs_correct",
            },
        ],
    )
    jsonl(
        path / "rollouts" / "step-20.jsonl",
        [{"prompt": "3+4=", "completion": "7<|end|>", "rewards": {"correct": 1.0}, "advantage": 0.7}],
    )
    (path / "eval").mkdir()
    final = {"task": "arithmetic", "n": 100, "accuracy": 0.7, "by_difficulty": {"1": 0.9, "2": 0.6}}
    (path / "eval" / "final.json").write_text(json.dumps({"rl": {"arithmetic": final}}))
    jsonl(
        path / "eval" / "arithmetic-seed7.jsonl",
        [{"prompt": "3+4=", "answer": "7", "completion": "7<|end|>", "rewards": {"correct": 1.0}}],
    )
    (path / "spikes").mkdir()
    dossier = {
        "step": 120,
        "stage": "pretrain",
        "score": 9.5,
        "first_departing": "blocks.2",
        "history": [
            {
                "step": s,
                "grad_norm": {f"blocks.{b}": 0.1 * (b + 1) * (5 if s == 120 and b == 2 else 1) for b in range(BLOCKS)},
            }
            for s in range(113, 121)
        ],
        "top_rows": [{"row": 3, "loss": 9.1, "tokens": "</script><b>x"}],
    }
    (path / "spikes" / "step-120.json").write_text(json.dumps(dossier))
    return path


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "synthetic")


def _figures(html: str) -> dict:
    data = re.search(r'<script type="application/json" id="glasslab-figures">(.*?)</script>', html, re.DOTALL).group(1)
    return json.loads(data)


def test_report_has_every_section_and_embeds_figure_data(run: Path) -> None:
    out = build_report(run)
    assert out == run / "report.html"
    html = out.read_text()
    for section in (
        "overview",
        "config",
        "stage-pretrain",
        "stage-sft",
        "stage-rl",
        "stage-eval",
        "gradients",
        "attention",
        "activations",
        "positions",
        "spikes",
        "timing",
        "events",
        "other",
        "eval-records",
    ):
        assert f'<section id="{section}">' in html, section
    assert "https://" not in html.split("uPlot, MIT licence")[0]  # nothing loaded from the network
    figs = _figures(html)
    titles = {f["title"] for f in figs.values()}
    assert {
        "Loss",
        "Reward (mean and per function)",
        "KL divergence",
        "Gradient norm per block (pretrain)",
        "Update / weight ratio per parameter (pretrain)",
        "Normalised attention entropy per head (pretrain)",
        "Loss by position (pretrain)",
        "Mean log Z (log-partition of the output logits) (pretrain)",
        "custom (pretrain)",
    } <= titles
    loss = next(f for f in figs.values() if f["title"] == "Loss")
    assert [s["label"] for s in loss["series"]] == ["train/loss", "val/loss"]
    assert len(loss["x"]) == 200 and loss["series"][1]["y"].count(None) == 200 - 8
    heat = next(f for f in figs.values() if f["title"] == "Normalised attention entropy per head (pretrain)")
    assert heat["rows"][:2] == ["blocks.0.h0", "blocks.0.h1"] and heat["threshold"] == 0.15
    assert heat["z"][heat["rows"].index("blocks.1.h0")][-1] == 0.05
    by_pos = next(f for f in figs.values() if f["title"] == "Loss by position (pretrain)")
    assert by_pos["x"] == [0.0, 1.0, 2.5, 5.5, 11.5, 23.5, 47.5, 95.5]  # bucket middles
    last = by_pos["series"][-1]
    assert [h - lo for h, lo in zip(last["hi"], last["lo"])] == pytest.approx([0.2] * 8)
    assert [(h + lo) / 2 for h, lo in zip(last["hi"], last["lo"])] == pytest.approx(last["y"])
    grads = next(f for f in figs.values() if f["title"] == "Gradient norm per block (pretrain)")
    assert grads["rows"] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "wte"] and grads["log"]
    assert "1 of 8 heads collapsed" in html
    assert "format reward rises while correctness falls" in html  # hacking warning in the RL section
    assert "&lt;/script&gt;&lt;b&gt;x" in html  # dossier text is escaped
    assert "clipping fired on 29 of 200 steps" in html
    assert "After rl" in html and "by_difficulty" in html  # eval/final.json


def test_spike_events_are_grouped_into_bursts_and_a_lone_one_keeps_its_row(run: Path) -> None:
    """Twelve spike events 10 steps apart in SFT are one row with their count and the highest-scoring message;
    the lone pretraining spike keeps its own row; the overview counts events and bursts."""
    t0 = json.loads((run / "events.jsonl").read_text().splitlines()[0])["time"]
    burst = [
        {
            "time": t0 + 300 + step,
            "kind": "spike",
            "message": f"grad_norm spike at step {step}",
            "step": step,
            "stage": "sft",
            "signals": {"grad_norm": {"score": 20.0 if step == 150 else 9.0}},
        }
        for step in range(100, 220, 10)
    ]
    with (run / "events.jsonl").open("a") as f:
        f.writelines(json.dumps(e) + "\n" for e in burst)
    html = build_report(run).read_text()
    assert "Warnings recorded: 13 spike (in 2 bursts), 1 hacking" in html
    events = html.split('<section id="events">')[1].split("</section>")[0]
    assert events.count("<tr") - 1 == 3  # header excluded: the pretraining spike, the SFT burst, the hacking event
    assert "12 spike events at steps 100-210; highest score: grad_norm spike at step 150" in events
    assert "loss spike at step 120" in events


def test_report_of_an_empty_run_has_only_overview(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "manifest.json").write_text(json.dumps({"status": "created"}))
    html = build_report(tmp_path / "r").read_text()
    assert '<section id="overview">' in html and '<section id="gradients">' not in html and _figures(html) == {}


def test_report_of_a_missing_run_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(GlasslabError, match="no manifest.json"):
        build_report(tmp_path / "nope")


def test_thin_keeps_extremes_and_last_point() -> None:
    x = np.arange(10_000)
    y = np.sin(x / 50.0)
    y[5000] = 40.0
    tx, ty = thin(x, y, 500)
    assert len(tx) <= 502 and ty.max() == 40.0 and tx[-1] == 9999


def test_position_buckets_parse() -> None:
    assert position_bucket("000-015") == (0.0, 15.0)
    assert position_bucket("b3") == (3.0, 3.0)
    assert position_bucket("first") is None


def test_compare_lists_config_differences_and_final_values(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", seed=0)
    b = make_run(tmp_path / "b", seed=1, lr=1e-2, qk_norm=False, loss_shift=0.3)
    summary = compare_summary([a, b])
    assert summary["config_diff"] == {
        "seed": {"a": 0, "b": 1},
        "model.qk_norm": {"a": True, "b": False},
        "train.lr": {"a": 3e-3, "b": 1e-2},
    }
    finals = summary["final_metrics"]
    assert finals["b"]["eval/arithmetic/after_rl/accuracy"] == pytest.approx(
        finals["a"]["eval/arithmetic/after_rl/accuracy"] + 0.3
    )
    assert not any("blocks." in n for n in finals["a"])  # per-block families stay on the run pages
    html = build_compare([a, b], tmp_path / "c.html").read_text()
    figs = _figures(html)
    loss = next(f for f in figs.values() if f["title"] == "train/loss" and len(f["x"]) == 200)
    assert [s["label"] for s in loss["series"]] == ["a", "b"]
    assert "model.qk_norm" in html


def test_compare_by_tokens_uses_the_logged_throughput(tmp_path: Path) -> None:
    runs = [make_run(tmp_path / "a"), make_run(tmp_path / "b", seed=1)]
    figs = _figures(build_compare(runs, tmp_path / "c.html", align="tokens", pattern="train/loss").read_text())
    pretrain = next(f for f in figs.values() if f["xlabel"] == "tokens" and len(f["series"]) == 2)
    assert pretrain["x"][0] > 1000  # tokens/s x step time of the first step, not the step number
    with pytest.raises(GlasslabError, match="at least two runs"):
        build_compare(runs[:1], tmp_path / "c.html")
    with pytest.raises(GlasslabError, match="no metric matches"):
        compare_summary(runs, pattern="nothing/*")


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_writes_a_figure(tmp_path: Path, suffix: str) -> None:
    runs = [make_run(tmp_path / "a"), make_run(tmp_path / "b", seed=1, loss_shift=0.2)]
    out = plot_metric(runs, "attn_entropy/*", tmp_path / f"fig{suffix}", stage="pretrain", smooth=0.5)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in data[:400]
    with pytest.raises(GlasslabError, match="no metric matches 'nope/\\*'"):
        plot_metric(runs, "nope/*", tmp_path / "x.png")
    with pytest.raises(GlasslabError, match=r"\.png, \.pdf or \.svg"):
        plot_metric(runs, "train/loss", tmp_path / "x.jpg")


def test_commands(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from glasslab.cli import app

    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b", seed=1)
    cli = CliRunner()
    res = cli.invoke(app, ["compare", str(a), str(b), "--out", str(tmp_path / "c.html"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["config_diff"] == {"seed": {"a": 0, "b": 1}} and (tmp_path / "c.html").exists()
    res = cli.invoke(
        app, ["plot", str(a), str(b), "--metric", "val/*", "--stage", "pretrain", "--out", str(tmp_path / "f.pdf")]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "f.pdf").read_bytes().startswith(b"%PDF")
    res = cli.invoke(app, ["report", str(a), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["report"] == str(a / "report.html")
