"""Studies: spec expansion, skip/resume decisions, statistics against hand computations, findings wording,
the study report from synthetic runs, and one tiny real study end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tomllib
from scipy import stats as sps
from test_report import make_run

from glasslab.errors import GlasslabError
from glasslab.report import build_report
from glasslab.report.rundata import Series
from glasslab.study import run_study
from glasslab.study.aggregate import RunResult, mean_curve
from glasslab.study.executor import action_for, claim_study_dir, command_for
from glasslab.study.findings import compute_findings
from glasslab.study.plan import expand
from glasslab.study.report import build_study_report
from glasslab.study.spec import StudySpec, builtin_names, load_spec
from glasslab.study.stats import summarize, welch


def spec_of(text: str) -> StudySpec:
    return StudySpec.model_validate(tomllib.loads(text))


GRID = """
name = "grid"
preset = "smoke"
stages = ["pretrain"]
seeds = [0, 1]
[overrides]
train.steps = 40
[[factors]]
name = "qk"
key = "model.qk_norm"
values = [true, false]
[[factors]]
name = "lr"
key = "train.lr"
values = [1e-3, "default"]
[[metrics]]
name = "val/loss"
"""


def test_grid_times_seeds_expands_to_named_runs_with_overrides() -> None:
    plan = expand(spec_of(GRID))
    assert plan.base is None and len(plan.runs) == 2 * 2 * 2
    assert [r.name for r in plan.runs[:3]] == [
        "qk=true-lr=0.001-seed0",
        "qk=true-lr=0.001-seed1",
        "qk=true-lr=0.003-seed0",
    ]
    run = plan.runs[-1]
    assert run.levels == {"qk": False, "lr": 0.003} and run.seed == 1  # "default" = the smoke preset's lr
    assert run.sets == ["train.steps=40", "model.qk_norm=false", "train.lr=0.003"] and run.stages == ["pretrain"]
    scaled = expand(spec_of(GRID), scale=2.5, seeds=3)
    assert scaled.seeds == [0, 1, 2] and len(scaled.runs) == 12 and "train.steps=100" in scaled.runs[0].sets


def test_shared_stages_make_one_base_run() -> None:
    spec = spec_of(
        GRID.replace('stages = ["pretrain"]', 'stages = ["pretrain", "sft", "rl"]\nshared_stages = ["pretrain", "sft"]')
        .replace('key = "model.qk_norm"', 'key = "rl.grpo.mask_truncated"')
        .replace('key = "train.lr"', 'key = "rl.grpo.beta"')
    )
    plan = expand(spec)
    assert (
        plan.base is not None
        and plan.base.name == "base"
        and plan.base.stages == ["pretrain", "sft"]
        and plan.base.seed == 0
    )
    assert all(r.stages == ["rl"] and r.from_base for r in plan.runs)
    assert plan.runs[-1].levels["lr"] == 0.1  # rl.grpo.beta's default
    cmd = command_for(plan.runs[0], plan, Path("/s/runs"), "start", threads=1)
    assert cmd[cmd.index("--from") + 1] == "/s/runs/base" and cmd[cmd.index("--stages") + 1] == "rl"
    assert "system.threads=1" in cmd and cmd[cmd.index("--seed") + 1] == "0"


def test_bad_specs_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shared stages"):
        spec_of(GRID.replace('stages = ["pretrain"]', 'stages = ["pretrain", "sft"]\nshared_stages = ["pretrain"]'))
    with pytest.raises(GlasslabError, match="unknown config key 'train.stpes'"):
        expand(spec_of(GRID.replace("train.steps = 40", "train.stpes = 40")))
    with pytest.raises(GlasslabError, match="did you mean 'zloss'"):
        load_spec("zlos")
    (tmp_path / "bad.toml").write_text('name = "x"\n[[metrics]]\nnme = "val/loss"\n')
    with pytest.raises(GlasslabError, match="bad.toml"):
        load_spec(str(tmp_path / "bad.toml"))


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_specs_expand(name: str) -> None:
    plan = expand(load_spec(name))
    assert plan.runs and all(r.sets for r in plan.runs)


def _manifest(path: Path, **fields: object) -> None:
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(fields))


def test_skip_done_resume_interrupted_keep_failed(tmp_path: Path) -> None:
    _manifest(tmp_path / "done", status="completed", stages_done=["pretrain", "sft"])
    _manifest(tmp_path / "half", status="completed", stages_done=["pretrain"])
    _manifest(tmp_path / "stopped", status="interrupted", stages_done=[])
    _manifest(tmp_path / "killed", status="running", stages_done=[])
    _manifest(tmp_path / "diverged", status="failed", stages_done=[])
    stages = ["pretrain", "sft"]
    assert action_for(tmp_path / "done", stages) == "skip"
    assert action_for(tmp_path / "half", stages) == "resume"
    assert action_for(tmp_path / "stopped", stages) == "resume"
    assert action_for(tmp_path / "killed", stages) == "resume"
    assert action_for(tmp_path / "diverged", stages) == "failed"
    assert action_for(tmp_path / "diverged", stages, retry_failed=True) == "resume"
    assert action_for(tmp_path / "never", stages) == "start"


def test_a_study_dir_refuses_a_changed_recipe_but_accepts_more_seeds(tmp_path: Path) -> None:
    claim_study_dir(expand(spec_of(GRID)), tmp_path)
    claim_study_dir(expand(spec_of(GRID), seeds=3), tmp_path)  # adds seed 2, the rest unchanged
    with pytest.raises(GlasslabError, match="other settings"):
        claim_study_dir(expand(spec_of(GRID.replace("train.steps = 40", "train.steps = 50"))), tmp_path)


def test_mean_and_ci_match_a_hand_computation() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0, None, float("nan")])
    assert s.n == 4 and s.mean == 2.5
    assert s.std == pytest.approx(math.sqrt(5 / 3))
    assert s.ci95 == pytest.approx(3.182446305284263 * math.sqrt(5 / 3) / 2)  # t(0.975, df=3)
    one = summarize([7.0])
    assert one.mean == 7.0 and math.isnan(one.ci95)


def test_welch_matches_a_hand_computation() -> None:
    a, b = [5.1, 4.9, 5.3, 5.0], [4.0, 4.4, 3.9]
    va, vb = sps.tvar(a) / 4, sps.tvar(b) / 3
    t = (sum(a) / 4 - sum(b) / 3) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    cmp = welch(a, b)
    assert cmp.p == pytest.approx(2 * sps.t.sf(t, df)) and cmp.significant
    assert cmp.ci95 == pytest.approx(sps.t.ppf(0.975, df) * math.sqrt(va + vb))
    assert welch([1.0, 1.0], [1.0, 1.0]).p == 1.0 and math.isnan(welch([1.0], [2.0, 3.0]).p)


def _results(values: dict[float, list[float | None]], metric: str = "final val/loss") -> list[RunResult]:
    out = []
    for lr, vals in values.items():
        for seed, v in enumerate(vals):
            status = "failed" if v is None else "completed"
            out.append(
                RunResult(f"lr={lr}-seed{seed}", Path("."), seed, {"lr": lr}, status, None, {metric: v}, vocab_size=512)
            )
    return out


SWEEP = """
name = "s"
preset = "smoke"
stages = ["pretrain"]
seeds = [0, 1, 2]
[[factors]]
name = "lr"
key = "train.lr"
values = [0.001, 0.01]
[[metrics]]
name = "val/loss"
label = "final val/loss"
"""


def test_findings_say_significant_for_a_clear_effect_and_not_for_a_null_one() -> None:
    plan = expand(spec_of(SWEEP))
    clear = compute_findings(plan, _results({0.001: [4.10, 4.12, 4.09], 0.01: [3.51, 3.50, 3.53]}))
    assert len(clear) == 1 and clear[0].significant
    assert clear[0].text.startswith(
        "lr=0.001: final val/loss 4.1 ± 0.038 vs 3.51 ± 0.038 with lr=0.01 (difference 0.59"
    )
    assert "p < 0.001, significant" in clear[0].text
    null = compute_findings(plan, _results({0.001: [4.10, 4.30, 3.95], 0.01: [4.05, 4.25, 4.12]}))
    assert not null[0].significant and "not significant" in null[0].text and null[0].p > 0.5


def test_failed_runs_are_counted_not_averaged_and_lr_sensitivity_caps_them() -> None:
    spec = spec_of(
        SWEEP.replace("values = [0.001, 0.01]", "values = [0.001, 0.01, 0.1]")
        + '[sensitivity]\nfactor = "lr"\nmetric = "final val/loss"\n'
    )
    results = _results({0.001: [4.0, 4.0, 4.0], 0.01: [3.0, 3.2, 3.1], 0.1: [5.0, None, None]})
    findings = compute_findings(expand(spec), results)
    sens = findings[0]
    assert sens.kind == "sensitivity"
    cap = math.log(512)  # ln V: a failed run counts as a uniform predictor
    expected = [((4.0 + 3.0 + 5.0) / 3 - 3.0), ((4.0 + 3.2 + cap) / 3 - 3.2), ((4.0 + 3.1 + cap) / 3 - 3.1)]
    assert sens.extra["per_seed"] == pytest.approx(expected)
    comparison = next(f for f in findings if f.kind == "comparison")
    assert (
        "highest at lr=0.1 (5)" in comparison.text
        and "2 of 3 runs with lr=0.1 did not complete (failed)" in comparison.text
    )


def test_a_smoothed_curve_is_each_runs_trailing_mean_then_the_mean_over_seeds() -> None:
    steps = np.arange(1, 7)
    runs = [
        RunResult(
            f"r{i}",
            Path("."),
            i,
            {},
            "completed",
            None,
            {},
            curves={"kl": Series(steps, np.array(v, float), steps * 1.0)},
        )
        for i, v in enumerate([[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7]])
    ]
    s, mean, _ = mean_curve(runs, "kl", smooth=3)
    assert list(s) == [3, 4, 5, 6] and mean == pytest.approx([2, 3, 4, 5])  # run means 1,2,3,4 and 3,4,5,6
    s, mean, _ = mean_curve(runs, "kl")
    assert list(s) == list(steps) and mean == pytest.approx([1, 2, 3, 4, 5, 6])


def test_study_report_from_run_directories(tmp_path: Path) -> None:
    spec = spec_of('curves = ["train/loss"]\n' + SWEEP.replace("seeds = [0, 1, 2]", "seeds = [0, 1]"))
    plan = expand(spec)
    for r in plan.runs:
        make_run(
            tmp_path / "runs" / r.name,
            seed=r.seed,
            lr=r.levels["lr"],
            loss_shift=0.5 if r.levels["lr"] == 0.01 else 0.0,
        )
    build_report(tmp_path / "runs" / plan.runs[0].name)
    summary = build_study_report(plan, tmp_path)
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"final-val-loss-by-lr.png", "curve-train-loss.png"}
    cell = summary["cells"][1]
    assert cell["levels"] == {"lr": 0.01} and cell["metrics"]["final val/loss"]["n"] == 2
    finding = summary["findings"][0]
    assert finding["difference"] == pytest.approx(-0.5, abs=0.05)
    html = (tmp_path / "report.html").read_text()
    assert "Findings" in html and 'src="data:image/png;base64,' in html
    assert (
        'href="runs/lr=0.001-seed0/report.html"' in html and 'href="runs/lr=0.001-seed1/report.html"' not in html
    )  # only built ones
    assert "# Study: s" in (tmp_path / "findings.md").read_text()


def test_tiny_study_runs_then_skips_what_is_done(tmp_path: Path) -> None:
    spec = tmp_path / "tiny.toml"
    spec.write_text("""
name = "tiny"
preset = "smoke"
stages = ["pretrain"]
seeds = [0]
[overrides]
train.steps = 3
train.eval_every = 3
train.checkpoint_every = 3
probes.mode = "off"
data.max_chars = 20000
[[factors]]
name = "lr"
key = "train.lr"
values = [1e-3, 3e-3]
[[metrics]]
name = "val/loss"
""")
    lines: list[str] = []
    summary = run_study(str(spec), study_dir=tmp_path / "study", workers=2, report=lines.append)
    assert [r["status"] for r in summary["runs"]] == ["completed", "completed"], (tmp_path / "study" / "logs").glob("*")
    assert all(isinstance(r["values"]["val/loss"], float) for r in summary["runs"])
    assert [e["action"] for e in summary["executed"]] == ["start", "start"]
    assert (tmp_path / "study" / "runs" / "lr=0.001-seed0" / "report.html").exists()
    again = run_study(str(spec), study_dir=tmp_path / "study", workers=2, report=lines.append)
    assert [e["action"] for e in again["executed"]] == ["skip", "skip"]


def test_a_baseline_level_is_compared_with_every_other_level() -> None:
    spec = spec_of(SWEEP.replace("values = [0.001, 0.01]", "values = [0.001, 0.01, 0.1]\nbaseline = 0.01"))
    findings = compute_findings(
        expand(spec), _results({0.001: [4.0, 4.1, 4.2], 0.01: [3.0, 3.1, 3.2], 0.1: [3.0, 3.2, 3.1]})
    )
    assert [f.text.split(":")[0] for f in findings] == ["lr=0.01", "lr=0.01"]
    assert [(f.groups[1]["level"], f.significant) for f in findings] == [(0.001, True), (0.1, False)]
    with pytest.raises(ValueError, match="baseline 0.5"):
        spec_of(SWEEP.replace("values = [0.001, 0.01]", "values = [0.001, 0.01]\nbaseline = 0.5"))
