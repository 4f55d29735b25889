"""The one end-to-end smoke test of the whole pipeline: `glasslab run --preset smoke`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq


def test_run_smoke_chains_every_stage_into_one_run_directory(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "glasslab", "run", "--preset", "smoke", "--name", "main", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    headline = json.loads(proc.stdout)
    run = tmp_path / "runs" / "main"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["stages_done"] == ["pretrain", "sft", "rl"]
    assert headline["status"] == "completed" and headline["val_bpb"] > 0
    assert 0 < headline["wall_time_s"] < 600 and headline["peak_rss_mb"] > 50  # torch alone takes more
    assert {"eval/arithmetic/after_sft/accuracy", "eval/arithmetic/after_rl/accuracy"} <= set(headline)
    for stage in ("pretrain", "sft", "rl"):
        assert any((run / "checkpoints" / stage).iterdir()), stage
    stages = set(pq.read_table(run / "metrics.parquet").column("stage").to_pylist())
    assert stages == {"pretrain", "sft", "rl", "eval"}
    final = json.loads((run / "eval" / "final.json").read_text())
    assert set(final) == {"sft", "rl"} and final["rl"]["arithmetic"]["n"] > 0
    html = (run / "report.html").read_text()
    assert "runs/main · completed ·" in html  # the report is built after the run is marked completed
    assert "<script" in html and "http://" not in html.split("<body", 1)[1][:200]

    # one run, each stage's checkpoint evaluated, sampled and chatted with in place (--stage, --step)
    def used(*args: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-m", "glasslab", *args, "--json"], cwd=tmp_path, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout)

    for stage in ("sft", "rl"):
        newest = max((run / "checkpoints" / stage).iterdir())
        result = used("eval", "runs/main", "--task", "arithmetic", "--stage", stage, "--n", "4", "--samples", "0")
        assert (result["stage"], Path(result["checkpoint"])) == (stage, newest) and result["n"] == 4
    oldest = min((run / "checkpoints" / "sft").iterdir())
    step = int(oldest.name.removeprefix("step-"))
    sample = used("sample", "runs/main", "--stage", "sft", "--step", str(step), "--max-new-tokens", "4")
    assert (sample["stage"], sample["step"], Path(sample["checkpoint"])) == ("sft", step, oldest)
    reply = used("chat", "runs/main", "--stage", "pretrain", "--prompt", "2+2", "--max-new-tokens", "4")
    assert reply["stage"] == "pretrain"
