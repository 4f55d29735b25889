"""Experiments: the decision rules against hand computations, what makes a candidate (and what is refused), the
ledger under SIGKILL, a patch on an isolated copy of the tree, the searcher, and one real A/A check on the smoke
model judged "no effect"."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from scipy import stats as sps
from typer.testing import CliRunner

from glasslab.cli import app
from glasslab.errors import GlasslabError
from glasslab.experiment import ledger
from glasslab.experiment.arms import Request, prepare
from glasslab.experiment.decision import judge
from glasslab.experiment.patch import patched_tree
from glasslab.experiment.runner import run_experiment
from glasslab.experiment.tune import load_tune_spec, tune
from glasslab.study.stats import paired
from glasslab.track import layout

SMOKE = {"base": "smoke", "budget": "6steps", "seeds": 2}


def test_paired_difference_matches_scipy() -> None:
    a, b = [3.1, 2.9, 3.4, 3.0], [3.0, 2.95, 3.1, 2.8]
    cmp = paired(a, b)
    d = [x - y for x, y in zip(a, b)]
    half = sps.t.ppf(0.975, 3) * sps.tstd(d) / 2
    assert cmp.difference == pytest.approx(sum(d) / 4) and cmp.ci95 == pytest.approx(half)
    assert cmp.p == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert paired([1.0, None, 2.0], [0.5, 1.0, math.nan]).p != paired([1.0, None, 2.0], [0.5, 1.0, 1.0]).p


def test_decision_rules() -> None:
    base = [2.00, 2.10, 1.95]
    better = judge(base, [1.80, 1.91, 1.74], goal="min")
    assert better.verdict == "better" and better.improvement == pytest.approx(0.2, abs=0.01) and better.p < 0.05
    assert better.noise_floor == pytest.approx(sps.tstd(base))
    assert judge(base, [1.80, 1.91, 1.74], goal="max").verdict == "worse"
    small = judge(base, [1.99, 2.09, 1.94], goal="min", min_effect=0.05)  # consistent, but below the minimum
    assert small.verdict == "no effect" and "minimum effect" in small.reason
    noisy = judge(base, [2.05, 2.0, 1.9], goal="min")
    assert noisy.verdict == "no effect" and "not significant" in noisy.reason
    assert judge(base, [1.8, None, 1.7], goal="min").verdict == "worse"  # the candidate diverged where base did not
    assert judge([2.0, None, None], [1.9, 1.8, None], goal="min").verdict == "inconclusive"


def test_candidate_is_the_config_difference_whatever_the_spelling() -> None:
    a = prepare(Request("lr", ["train.lr=0.001", "model.qk_norm=false"], **SMOKE))
    b = prepare(Request("lr", ["model.qk_norm = false", "train.lr=1e-3"], **SMOKE))
    assert a.candidate_sets == b.candidate_sets and a.changes == {
        "model.qk_norm": [True, False],
        "train.lr": [3e-3, 1e-3],
    }
    assert a.baseline_sets == ['train.budget="6steps"', "train.steps=6"] and a.refusal is None
    assert prepare(Request("seed", ["seed=7"], **SMOKE)).refusal.startswith("the candidate changes only the seed")
    assert "changes nothing" in prepare(Request("same lr", ["train.lr=3e-3"], **SMOKE)).refusal
    assert "do not read" in prepare(Request("probes", ["probes.mode=off", "rl.grpo.beta=0.2"], **SMOKE)).refusal
    assert prepare(Request("acc", metric="eval/arithmetic/accuracy")).goal == "max"


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"seeds": 1}, "at least 2 seeds"),
        ({"budget": "soon"}, "--budget"),
        ({"stages": ["sft", "pretrain"]}, "in that order"),
        ({"base": "huge"}, "neither a preset"),
        ({"sets": ["train.lrr=1"]}, "did you mean 'train.lr'"),
        ({"aa": True, "sets": ["train.lr=1e-3"]}, "--aa"),
        ({"metric": "val/*"}, "one metric"),
    ],
)
def test_bad_requests_fail_before_anything_is_made(tmp_path, kw, message) -> None:
    with pytest.raises(GlasslabError, match=message):
        run_experiment(Request("x", **{**SMOKE, **kw}), root=tmp_path / "exp")
    assert not (tmp_path / "exp").exists()


def test_seed_only_candidate_is_refused_and_recorded(tmp_path) -> None:
    root = tmp_path / "exp"
    result = CliRunner().invoke(
        app, ["experiment", "new seed", "--set", "seed=5", "--base", "smoke", "--dir", str(root), "--json"]
    )
    assert result.exit_code == 3
    entry = json.loads(result.stdout)
    assert entry["decision"] == "refused" and "only the seed" in entry["reason"]
    assert not (root / layout.STUDY_RUNS).exists()  # nothing trained
    listed = json.loads(CliRunner().invoke(app, ["ledger", "--dir", str(root), "--json"]).stdout)
    assert [e["id"] for e in listed["entries"]] == [entry["id"]] and listed["aa"]["checks"] == 0


def test_ledger_append_cuts_a_torn_last_line(tmp_path) -> None:
    path = tmp_path / layout.LEDGER
    ledger.append(path, {"id": "a", "n": 0})
    with open(path, "ab") as f:
        f.write(b'{"id": "b", "n": 1, "half')  # a writer killed mid-line
    assert [e["id"] for e in ledger.read(path)] == ["a"]
    ledger.append(path, {"id": "c", "n": 2})
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "c"]


WRITER = """
import sys
from glasslab.experiment import ledger
for n in range(10**6):
    ledger.append(sys.argv[1], {"id": f"e{n}", "n": n, "payload": "x" * 200000})
"""


def test_ledger_survives_sigkill_in_the_middle_of_appends(tmp_path) -> None:
    path = tmp_path / layout.LEDGER
    for kill in range(3):
        before = len(ledger.read(path))
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        deadline = time.monotonic() + 60
        while len(ledger.read(path)) < before + 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.003 * kill)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        entries = ledger.read(path)
        assert len(entries) >= before + 3
        written = [e for e in entries if not e["id"].startswith("after-kill")]
        assert all(len(e["payload"]) == 200000 for e in written)  # no half entry is read as one
        ledger.append(path, {"id": f"after-kill-{kill}"})
        lines = path.read_bytes().split(b"\n")
        assert lines[-1] == b"" and all(json.loads(line) for line in lines[:-1])  # no torn line left in the file


def test_aa_check_on_the_smoke_model_is_no_effect(tmp_path) -> None:
    root = tmp_path / "exp"
    entry = run_experiment(Request("A/A", aa=True, **SMOKE), root=root, workers=2, report=lambda _: None)
    assert entry["kind"] == "aa" and entry["verdict"] == "no effect" and entry["decision"] == "discarded"
    [screen] = entry["rounds"]
    seeds = screen["seeds"]
    assert not set(seeds["baseline"]) & set(seeds["candidate"])  # independent seeds
    assert min(seeds["baseline"]) >= ledger.FRESH_SEEDS_FROM
    values = [r["value"] for arm in screen["arms"].values() for r in arm["runs"]]
    assert all(v is not None and 1.0 < v < 10.0 for v in values) and entry["noise_floor"] > 0
    assert ledger.aa_rate(ledger.read(root / layout.LEDGER)) == {"checks": 1, "false_effects": 0, "false_kept": 0}
    page = (root / layout.LEDGER_PAGE).read_text()
    assert "data:image/png" in page and 'href="runs/' in page and "A/A checks: 0 of 1 called noise an effect" in page


TUNE = """
name = "t"
base = "smoke"
seeds = 2
budget = "6steps"
max_experiments = 4
[[knobs]]
key = "train.lr"
values = [1e-3, 3e-3, 1e-2]
[[knobs]]
key = "train.warmup_steps"
values = [5, 2]
"""


def test_tune_is_a_deterministic_coordinate_search(tmp_path) -> None:
    spec_path = tmp_path / "t.toml"
    spec_path.write_text(TUNE)
    asked = []

    def fake(req: Request) -> dict:
        asked.append((tuple(req.base_sets), tuple(req.sets)))
        kept = req.sets == ["train.lr=0.001"]
        reason = "better" if kept else "not significant"
        rounds = [{"judgement": {"reason": reason}}]
        return {"id": str(len(asked)), "decision": "kept" if kept else "discarded", "reason": reason, "rounds": rounds}

    result = tune(load_tune_spec(spec_path), fake, report=lambda _: None)
    # lr=3e-3 is smoke's own value and warmup 5 too: skipped; after lr=1e-3 is kept, later ones build on it
    assert asked == [
        ((), ("train.lr=0.001",)),
        (("train.lr=0.001",), ("train.lr=0.003",)),
        (("train.lr=0.001",), ("train.lr=0.01",)),
        (("train.lr=0.001",), ("train.warmup_steps=2",)),
    ]
    assert result["best_sets"] == ["train.lr=0.001"] and result["improved"] and len(result["experiments"]) == 4
    spec_path.write_text(TUNE.replace("train.warmup_steps", "train.warmup"))
    with pytest.raises(GlasslabError, match="train.warmup"):
        tune(load_tune_spec(spec_path), fake)


PATCH = """--- a/plugmod.py
+++ b/plugmod.py
@@ -1 +1 @@
-VALUE = 1
+VALUE = 2
"""


def test_patch_applies_to_an_isolated_copy_and_the_users_tree_is_untouched(tmp_path) -> None:
    tree, root = tmp_path / "mine", tmp_path / "mine" / "experiments"
    tree.mkdir()
    (tree / "plugmod.py").write_text("VALUE = 1\n")
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "big.bin").write_bytes(b"x")  # the experiments directory is not copied
    (tmp_path / "change.diff").write_text(PATCH)
    before = {p: p.read_bytes() for p in tree.rglob("*") if p.is_file()}

    copy = patched_tree(tmp_path / "change.diff", tree, root)
    assert {p: p.read_bytes() for p in tree.rglob("*") if p.is_file() and "trees" not in p.parts} == before
    assert (copy.path / "plugmod.py").read_text() == "VALUE = 2\n" and not (copy.path / "experiments").exists()
    probe = [sys.executable, "-c", "import plugmod; print(plugmod.VALUE)"]
    shown = subprocess.run(probe, env={**os.environ, **copy.env()}, cwd=tmp_path, capture_output=True, text=True)
    assert shown.stdout.strip() == "2"  # the candidate's runs import the patched copy
    assert patched_tree(tmp_path / "change.diff", tree, root).path == copy.path  # same tree and patch: reused

    (tmp_path / "bad.diff").write_text(PATCH.replace("VALUE = 1", "VALUE = 7"))
    with pytest.raises(GlasslabError, match="does not apply"):
        patched_tree(tmp_path / "bad.diff", tree, root)
    assert sorted(p.name for p in (root / layout.EXPERIMENT_TREES).iterdir()) == [copy.path.name]
    assert (tree / "plugmod.py").read_text() == "VALUE = 1\n"
