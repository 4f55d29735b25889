"""The run directory's contract (glasslab.track.layout): names build and parse back, RunDir reaches every path,
the manifest keys the code writes are declared, and the readers (report, compare, plot, runs, probes view, study
aggregation) work in a process without torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_report import make_run

import glasslab
from glasslab.errors import GlasslabError
from glasslab.track import layout
from glasslab.track.rundir import RunDir


@pytest.mark.parametrize("step", [0, 7, 1234567, 12345678])
def test_step_names_round_trip(step: int) -> None:
    assert layout.step_of_checkpoint(Path("runs/x/checkpoints/sft") / layout.checkpoint_name(step)) == step
    assert layout.step_of_reference(layout.reference_name(step)) == step
    assert layout.step_of_file(layout.spike_name(step), "json") == step
    assert layout.step_of_file(layout.rollout_name(step), "jsonl") == step


def test_parsers_reject_other_names() -> None:
    assert layout.checkpoint_name(3) == "step-0000003"
    assert layout.step_of_checkpoint(f"{layout.TMP_PREFIX}step-0000003") is None
    assert layout.step_of_checkpoint(layout.reference_name(3)) is None
    assert layout.step_of_reference(layout.checkpoint_name(3)) is None
    assert layout.step_of_file(layout.rollout_name(3), "json") is None
    assert layout.step_of_file(layout.spike_name(3), "jsonl") is None
    assert layout.step_of_file("notes.json", "json") is None
    assert layout.parse_eval_table(layout.FINAL_EVAL) is None


@pytest.mark.parametrize(
    ("task", "seed", "written"),
    [("arithmetic", 0, "arithmetic"), ("countdown:hard", 12, "countdown-hard"), ("a/b-seed3", 1, "a-b-seed3")],
)
def test_eval_table_names_round_trip(task: str, seed: int, written: str) -> None:
    assert layout.parse_eval_table(layout.eval_table_name(task, seed)) == (written, seed)


def test_metric_names_and_families() -> None:
    name = layout.metric(layout.EVAL_FAMILY, "arithmetic", "after_rl", "pass@4")
    assert name == "eval/arithmetic/after_rl/pass@4"
    assert layout.family_of(name) == layout.EVAL_FAMILY
    assert layout.family_of(layout.metric(layout.ATTN_BOS, "blocks.2.h1")) == layout.ATTN_BOS
    assert len(set(layout.METRIC_FAMILIES)) == len(layout.METRIC_FAMILIES)
    assert layout.PIPELINE == ("pretrain", "sft", "rl") and layout.STAGES[-1] == layout.EVAL


def test_probe_families_are_defined_once() -> None:
    """The report's titles, the terminal view's columns and the emitters' names all come from the layout."""
    from glasslab.probes.forward import ATTENTION_METRICS
    from glasslab.probes.view import BLOCK_COLUMNS
    from glasslab.report import sections

    assert tuple(sections.GRADIENT_TITLES) == layout.GRADIENT_FAMILIES
    assert tuple(sections.ATTENTION_TITLES) == layout.ATTENTION_FAMILIES
    assert tuple(sections.ACTIVATION_TITLES) == layout.ACTIVATION_FAMILIES
    assert set(ATTENTION_METRICS.values()) == set(layout.ATTENTION_FAMILIES)
    assert set(BLOCK_COLUMNS) <= set(layout.PROBE_FAMILIES)


def test_rundir_reaches_every_path_of_the_layout(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "runs" / "r")
    top = {
        run.config_path,
        run.manifest_path,
        run.tokenizer_path,
        run.metrics_db_path,
        run.metrics_parquet_path,
        run.samples_path,
        run.events_path,
        run.report_path,
        run.checkpoints_dir,
        run.spikes_dir,
        run.rollouts_dir,
        run.eval_dir,
    }
    assert {p.relative_to(run.path).as_posix() for p in top} == {
        layout.CONFIG,
        layout.MANIFEST,
        layout.TOKENIZER,
        layout.METRICS_DB,
        layout.METRICS_PARQUET,
        layout.SAMPLES,
        layout.EVENTS,
        layout.REPORT,
        layout.CHECKPOINTS,
        layout.SPIKES,
        layout.ROLLOUTS,
        layout.EVAL_DIR,
    }
    assert run.checkpoint_path("sft", 12) == run.path / "checkpoints" / "sft" / "step-0000012"
    assert run.reference_path(40) == run.path / "checkpoints" / "rl" / "reference-step-0000040.safetensors"
    assert run.final_eval_path == run.path / "eval" / "final.json"
    assert run.token_cache_dir == tmp_path / "runs" / ".cache"

    for step in (20, 3):
        for path in (run.spike_path(step), run.rollout_path(step)):
            path.parent.mkdir(exist_ok=True)
            path.write_text("{}\n")
    (run.spikes_dir / "notes.txt").write_text("not a dossier")
    table = run.eval_table_path("countdown:hard", 2)
    table.parent.mkdir()
    table.write_text("{}\n")
    assert run.spike_files() == [(3, run.spike_path(3)), (20, run.spike_path(20))]
    assert run.rollout_files() == [(3, run.rollout_path(3)), (20, run.rollout_path(20))]
    assert run.eval_tables() == [table]
    assert run.read_final_eval() == {}
    run.final_eval_path.write_text(json.dumps({"rl": {"countdown": {"accuracy": 0.5}}}))
    assert run.read_final_eval() == {"rl": {"countdown": {"accuracy": 0.5}}}


def test_manifest_keys_are_the_declared_ones(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r")
    assert set(run.read_manifest()) <= set(layout.MANIFEST_KEYS)
    assert run.read_manifest()["status"] in layout.STATUSES
    with pytest.raises(ValueError, match="not manifest keys"):
        run.update_manifest(stages=["sft"])
    written = set()
    for source in Path(glasslab.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "update_manifest":
                written.update(k.arg for k in node.keywords)
    assert written and written <= set(layout.MANIFEST_KEYS)


def test_bad_manifest_and_config_are_user_errors(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "r")
    run.config_path.write_text("seed = [")
    with pytest.raises(GlasslabError, match="not valid TOML"):
        run.read_config()
    run.manifest_path.write_text("{")
    with pytest.raises(GlasslabError, match="not valid JSON"):
        run.read_manifest()


READERS = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, NoTorch())
from pathlib import Path

import glasslab.commands.compare, glasslab.commands.plot, glasslab.commands.probes, glasslab.commands.report
import glasslab.commands.runs
import glasslab.study.aggregate, glasslab.study.report, glasslab.track.layout, glasslab.track.metrics
from glasslab.report import build_report
from glasslab.report.compare import build_compare
from glasslab.probes.view import probe_summary
from glasslab.report.plot import plot_metric
from glasslab.track.rundir import list_runs

a, b = Path(sys.argv[1]), Path(sys.argv[2])
assert build_report(a).stat().st_size > 0
assert build_compare([a, b], a.parent / "compare.html").stat().st_size > 0
assert plot_metric([a, b], "val/loss", a.parent / "figure.png").stat().st_size > 0
assert [r["name"] for r in list_runs(a.parent)] == ["a", "b"]
assert probe_summary(a)["spikes"][0]["step"] == 120
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print("ok")
"""


def test_readers_work_without_torch(tmp_path: Path) -> None:
    a, b = make_run(tmp_path / "a", seed=0), make_run(tmp_path / "b", seed=1, lr=1e-2)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(READERS), str(a), str(b)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert (a / "report.html").is_file()
