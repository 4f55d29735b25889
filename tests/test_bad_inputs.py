"""Bad input to every command: exit code 2, one line on stderr that names the option or key, and nothing under
the lab directory (runs, caches, studies, figures) created or changed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TINY = ["--preset", "smoke", "--set", "probes.mode=off"]

# (id, arguments, text the message must contain: the option, key or value at fault)
CASES = [
    ("negative-steps", ["pretrain", *TINY, "--set", "train.steps=-1"], "train.steps"),
    (
        "heads-do-not-divide",
        ["pretrain", *TINY, "--set", "model.n_embd=100", "--set", "model.n_head=3"],
        "model.n_embd (100)",
    ),
    ("bpe-vocab-too-small", ["pretrain", *TINY, "--set", "tokenizer.vocab_size=100"], "tokenizer.vocab_size"),
    ("misspelt-key", ["pretrain", *TINY, "--set", "train.lrr=1"], "did you mean 'train.lr'"),
    ("missing-data", ["pretrain", *TINY, "--data", "missing.txt"], "missing.txt"),
    ("binary-data", ["pretrain", *TINY, "--data", "binary.bin"], "--data"),
    ("name-escapes", ["pretrain", *TINY, "--name", "../escape"], "--name"),
    ("name-has-separator", ["pretrain", *TINY, "--name", "a/b"], "--name"),
    ("name-taken", ["pretrain", *TINY, "--name", "base"], "--name"),
    ("bad-toml", ["pretrain", *TINY, "--config", "bad.toml"], "bad.toml"),
    ("unknown-device", ["pretrain", *TINY, "--set", "system.device=nodevice"], "system.device"),
    ("negative-seed", ["pretrain", *TINY, "--seed", "-1"], "--seed"),
    ("unknown-option", ["pretrain", "--stepz", "3"], "--stepz"),
    ("sft-bad-jsonl-line", ["sft", "runs/base", *TINY, "--data", "bad.jsonl"], "line 2"),
    ("sft-unknown-task", ["sft", "runs/base", *TINY, "--tasks", "nosuchtask"], "nosuchtask"),
    ("sft-negative-weight", ["sft", "runs/base", *TINY, "--set", "sft.weights={arithmetic=-1}"], "sft.weights"),
    ("rl-unknown-env", ["rl", "runs/base", *TINY, "--env", "nosuchenv"], "nosuchenv"),
    ("rl-unknown-reward", ["rl", "runs/base", *TINY, "--set", "rl.reward_weights={bogus=1}"], "bogus"),
    (
        "rl-key-of-other-algorithm",
        ["rl", "runs/base", *TINY, "--algo", "dpo", "--set", "rl.grpo.beta=0.2"],
        "rl.grpo.beta",
    ),
    ("run-unknown-stage", ["run", *TINY, "--stages", "pretrain,foo"], "--stages"),
    ("run-stages-out-of-order", ["run", *TINY, "--stages", "sft,pretrain"], "--stages"),
    ("run-bad-sft-file", ["run", *TINY, "--set", 'sft.data="bad.jsonl"'], "line 2"),
    ("resume-no-such-run", ["resume", "runs/nothing"], "runs/nothing"),
    ("eval-stage-without-checkpoint", ["eval", "runs/base", "--task", "arithmetic", "--stage", "rl"], "--stage"),
    ("eval-missing-step", ["eval", "runs/base", "--task", "arithmetic", "--step", "999"], "--step"),
    ("eval-unknown-task", ["eval", "runs/base", "--task", "nosuchtask"], "nosuchtask"),
    ("sample-negative-temperature", ["sample", "runs/base", "--temperature", "-1"], "--temperature"),
    ("sample-zero-top-p", ["sample", "runs/base", "--top-p", "0"], "--top-p"),
    ("sample-n-not-a-number", ["sample", "runs/base", "--n", "abc"], "--n"),
    ("chat-json-without-prompt", ["chat", "runs/base", "--json"], "--json"),
    ("chat-zero-top-k", ["chat", "runs/base", "--prompt", "hi", "--top-k", "0"], "--top-k"),
    ("runs-unknown-option", ["runs", "--compactt"], "--compactt"),
    ("report-no-such-run", ["report", "runs/nothing"], "runs/nothing"),
    ("compare-one-run", ["compare", "runs/base"], "two runs"),
    ("plot-smooth-out-of-range", ["plot", "runs/base", "--metric", "train/loss", "--smooth", "1"], "--smooth"),
    ("probes-no-such-run", ["probes", "runs/nothing"], "runs/nothing"),
    ("study-unknown", ["study", "nosuchstudy"], "nosuchstudy"),
    ("study-zero-workers", ["study", "kl-ablation", "--workers", "0"], "--workers"),
    ("study-name-escapes", ["study", "escape.toml", "--dry-run"], "study name"),
]


def glasslab(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glasslab", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under `root`: relative path -> (mtime in ns, size)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lab directory with one two-step pretraining run (runs/base) and the bad files the cases name."""
    root = tmp_path_factory.mktemp("lab")
    base = ["pretrain", *TINY, "--set", "train.steps=2", "--set", "train.checkpoint_every=1", "--name", "base"]
    proc = glasslab(base, root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (root / "binary.bin").write_bytes(b"\x00\x01\x02" * 100)
    (root / "bad.toml").write_text("[train\nsteps = 3\n")
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    (root / "bad.jsonl").write_text(good + "\n" + '{"messages": [{"role": "user"}]}\n')
    (root / "escape.toml").write_text('name = "../escape"\n[[metrics]]\nname = "val/loss"\nstage = "pretrain"\n')
    return root


@pytest.mark.parametrize(("args", "names"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_behind(lab: Path, args: list[str], names: str):
    before = snapshot(lab)
    proc = glasslab(args, lab)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert names in lines[0]
    assert snapshot(lab) == before


def test_a_new_run_failing_before_training_is_removed_and_one_failing_in_training_kept(tmp_path: Path):
    """The safety net for input that only the stage can check (a task's conversations longer than the context)."""
    from glasslab.commands.common import removed_if_untrained
    from glasslab.errors import GlasslabError
    from glasslab.track.rundir import RunDir

    for trained in (False, True):
        run = RunDir.create(tmp_path / f"trained-{trained}")
        if trained:
            run.metrics_db_path.write_bytes(b"")  # the stage's metric store: training had begun
        with pytest.raises(GlasslabError), removed_if_untrained(run):
            raise GlasslabError("bad input")
        assert run.path.exists() == trained
