"""The pretraining stage through the real CLI: end to end, kill-and-resume, and bad input; RL from its run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

SMOKE = [
    "--preset",
    "smoke",
    "--set",
    "train.steps=40",
    "--set",
    "train.checkpoint_every=10",
    "--set",
    "probes.mode=off",
]


def glasslab(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "glasslab", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"glasslab {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return proc


def losses(run: Path) -> dict[int, float]:
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    return {r["step"]: r["value"] for r in rows if r["name"] == "train/loss"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("cli")
    out = glasslab("pretrain", *SMOKE, "--name", "ref", "--json", cwd=cwd)
    summary = json.loads(out.stdout)
    assert summary["status"] == "completed" and summary["last_step"] == 40
    return cwd / "runs" / "ref"


def test_pretrain_writes_the_run_directory_contract(reference_run: Path):
    for name in ("config.toml", "manifest.json", "tokenizer.json", "metrics.parquet", "samples.jsonl"):
        assert (reference_run / name).is_file(), name
    manifest = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["stages_done"] == ["pretrain"] and manifest["last_step"] == 40
    table = pq.read_table(reference_run / "metrics.parquet")
    assert [str(t) for t in table.schema.types] == ["int64", "string", "string", "double", "double"]
    names = set(table.column("name").to_pylist())
    assert {"train/loss", "val/loss", "val/bpb", "optim/lr", "optim/grad_norm", "throughput/tokens_per_s"} <= names
    ckpts = sorted((reference_run / "checkpoints" / "pretrain").iterdir())
    assert [c.name for c in ckpts] == ["step-0000030", "step-0000040"]  # keep_last = 2
    assert (ckpts[-1] / "model.safetensors").is_file()


def test_kill_and_resume_matches_uninterrupted_losses(reference_run: Path, tmp_path: Path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "glasslab", "pretrain", *SMOKE, "--name", "k"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    ckpt = tmp_path / "runs" / "k" / "checkpoints" / "pretrain" / "step-0000020"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    manifest = json.loads((tmp_path / "runs" / "k" / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["last_step"] < 40  # killed mid-run
    out = glasslab("resume", "runs/k", "--json", cwd=tmp_path)
    assert json.loads(out.stdout)["status"] == "completed"
    assert losses(tmp_path / "runs" / "k") == losses(reference_run)  # step for step, exactly


def test_sample_and_runs_listing(reference_run: Path):
    cwd = reference_run.parent.parent
    out = glasslab(
        "sample", "runs/ref", "--prompt", "ROMEO.", "--max-new-tokens", "20", "--seed", "3", "--json", cwd=cwd
    )
    again = glasslab(
        "sample", "runs/ref", "--prompt", "ROMEO.", "--max-new-tokens", "20", "--seed", "3", "--json", cwd=cwd
    )
    sample = json.loads(out.stdout)
    assert sample["samples"][0].startswith("ROMEO.") and sample == json.loads(again.stdout)
    runs = json.loads(glasslab("runs", "--json", cwd=cwd).stdout)
    ref = next(r for r in runs if r["name"] == "ref")
    assert ref["status"] == "completed" and "val/bpb" in ref["metrics"]


def test_rl_from_a_pretrained_run_says_it_has_no_sft(reference_run: Path):
    """RL from a base model runs (an R1-Zero-style experiment), with a notice saying what to expect and why."""
    cwd = reference_run.parent.parent
    rl = ["--preset", "smoke", "--set", "rl.train.steps=1", "--set", "probes.mode=off"]
    proc = glasslab("rl", "runs/ref", *rl, "--name", "rl-base", "--json", cwd=cwd)
    assert json.loads(proc.stdout)["status"] == "completed" and "has no SFT checkpoint" in proc.stderr
    events = [json.loads(line) for line in (cwd / "runs" / "rl-base" / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events if "no SFT checkpoint" in e["message"]] == ["notice"]


def test_rl_under_torchrun_with_two_ranks(reference_run: Path):
    """Data-parallel RL on CPU (gloo): every rank trains, rank 0 alone reports and writes, reference resets
    happen on every rank."""
    cwd = reference_run.parent.parent
    rl = ["--preset", "smoke", "--set", "rl.train.steps=4", "--set", "rl.ref_reset_every=2", "--set", "probes.mode=off"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*torchrun, "-m", "glasslab", "rl", "runs/ref", *rl, "--name", "rl-ddp", "--json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["status"] == "completed"  # one JSON document: rank 1 prints nothing
    refs = sorted(p.name for p in (cwd / "runs" / "rl-ddp" / "checkpoints" / "rl").glob("reference-*"))
    assert refs == ["reference-step-0000002.safetensors", "reference-step-0000004.safetensors"]


def test_binary_data_and_corrupt_checkpoint_are_clear_errors(reference_run: Path, tmp_path: Path):
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    proc = glasslab("pretrain", "--preset", "smoke", "--data", str(binary), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # refused before anything was created
    copy = tmp_path / "runs" / "copy"
    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(reference_run), str(copy)], check=True)
    (copy / "checkpoints" / "pretrain" / "step-0000040" / "model.safetensors").write_bytes(b"garbage")
    proc = glasslab("sample", str(copy), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_nan_stops_the_run_as_failed_and_names_the_step(tmp_path: Path):
    proc = glasslab(
        "pretrain",
        "--preset",
        "smoke",
        "--set",
        "train.lr=1e6",
        "--set",
        "train.grad_clip=0",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "probes.mode=off",
        "--name",
        "boom",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "became" in proc.stderr and "at step" in proc.stderr
    manifest = json.loads((tmp_path / "runs" / "boom" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "at step" in manifest["message"]
