"""Tests for the run directory contract: atomic files, manifest, events, metrics, checkpoints."""

import json
import math
import sqlite3
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from glasslab.errors import GlasslabError
from glasslab.track.atomic import append_jsonl, read_jsonl, write_bytes_atomic, write_json_atomic, write_text_atomic
from glasslab.track.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from glasslab.track.metrics import SCHEMA, MetricStore, read_metrics
from glasslab.track.rundir import RunDir, list_runs
from glasslab.track.runname import check_run_name

# ---- atomic ------------------------------------------------------------------------------------


def test_atomic_writes_replace_and_leave_no_temp_files(tmp_path):
    write_text_atomic(tmp_path / "a.toml", "x = 1\n")
    write_text_atomic(tmp_path / "a.toml", "x = 2\n")
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    write_json_atomic(tmp_path / "c.json", {"k": [1, 2]})
    assert (tmp_path / "a.toml").read_text() == "x = 2\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"k": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.toml", "b.bin", "c.json"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "m.json", {"bad": object()})
    assert json.loads((tmp_path / "m.json").read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_jsonl_skips_torn_line_and_appends_after_it(tmp_path):
    path = tmp_path / "events.jsonl"
    assert read_jsonl(path) == []
    append_jsonl(path, {"i": 0})
    append_jsonl(path, {"i": 1})
    with open(path, "ab") as f:  # a crash mid-write
        f.write(b'{"i": 2, "tr')
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}]
    append_jsonl(path, {"i": 3})  # the resumed run keeps appending
    assert read_jsonl(path) == [{"i": 0}, {"i": 1}, {"i": 3}]


# ---- run directory -----------------------------------------------------------------------------


def test_create_open_and_manifest(tmp_path):
    run = RunDir.create(tmp_path / "runs" / "r1")
    assert run.checkpoints_dir.is_dir()
    m = run.read_manifest()
    assert m["status"] == "created" and m["stages_done"] == [] and m["last_step"] == 0
    assert m["torch_version"] == torch.__version__ and m["device"] is None and m["seed"] is None
    assert m["created"].endswith("+00:00") and m["created"] == m["updated"]
    assert m["git_commit"] is None or len(m["git_commit"]) == 40

    run.update_manifest(device="cpu", seed=7, stage="pretrain")
    run.set_status("running")
    run.mark_stage_done("pretrain")
    run.mark_stage_done("pretrain")
    run.set_status("failed", message="loss is NaN")
    m = RunDir.open(run.path).read_manifest()
    assert (m["device"], m["seed"], m["stage"], m["status"]) == ("cpu", 7, "pretrain", "failed")
    assert m["stages_done"] == ["pretrain"] and m["message"] == "loss is NaN"
    assert m["updated"] >= m["created"]
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoints", "manifest.json"]
    with pytest.raises(ValueError):
        run.set_status("done")


def test_create_refuses_existing_run_unless_overwrite(tmp_path):
    run = RunDir.create(tmp_path / "r1")
    run.log_sample({"text": "hi"})
    with pytest.raises(GlasslabError, match=r"run 'r1' already exists .*--overwrite"):
        RunDir.create(tmp_path / "r1")
    RunDir.create(tmp_path / "r1", overwrite=True)
    assert not run.samples_path.exists()

    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "precious.txt").write_text("keep me")
    with pytest.raises(GlasslabError, match="not a glasslab run"):
        RunDir.create(tmp_path / "notarun", overwrite=True)
    assert (tmp_path / "notarun" / "precious.txt").exists()


def test_open_missing_run(tmp_path):
    with pytest.raises(GlasslabError, match="no run at"):
        RunDir.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GlasslabError, match="no run at"):
        RunDir.open(tmp_path / "empty")


def test_events_and_samples(tmp_path):
    run = RunDir.create(tmp_path / "r")
    assert run.events() == []
    run.log_event("spike", "loss jumped 3x", step=120, stage="pretrain", loss=9.5)
    run.log_event("notice", "started")
    run.log_sample({"step": 5, "text": "once upon"})
    e = run.events()
    assert [x["kind"] for x in e] == ["spike", "notice"]
    assert e[0]["step"] == 120 and e[0]["stage"] == "pretrain" and e[0]["loss"] == 9.5
    assert isinstance(e[0]["time"], float) and e[1]["step"] is None
    assert run.samples() == [{"step": 5, "text": "once upon"}]


def test_truncate_logs_after_drops_what_a_resume_logs_again(tmp_path):
    run = RunDir.create(tmp_path / "r")
    for stage, step in (("pretrain", 50), ("sft", 3), ("sft", 4), ("sft", 5), ("sft", None)):
        run.log_event("spike", f"{stage} {step}", step=step, stage=stage)
    run.log_sample({"stage": "sft", "step": 3, "text": "kept"})
    run.log_sample({"stage": "sft", "step": 5, "text": "dropped"})
    before = run.events_path.read_bytes()
    run.truncate_logs_after("sft", 5)  # nothing after step 5: the files are left as they are
    assert run.events_path.read_bytes() == before and len(run.samples()) == 2
    run.truncate_logs_after("sft", 3)
    assert [e["message"] for e in run.events()] == ["pretrain 50", "sft 3", "sft None"]
    assert [s["text"] for s in run.samples()] == ["kept"]
    RunDir.create(tmp_path / "empty").truncate_logs_after("sft", 0)  # no files yet


def test_list_runs(tmp_path):
    runs = tmp_path / "runs"
    assert list_runs(runs) == []
    a = RunDir.create(runs / "b-first")
    a.update_manifest(created="2024-01-01T00:00:00.000+00:00", status="completed", last_step=10)
    b = RunDir.create(runs / "a-second")
    (runs / "stray").mkdir()
    with MetricStore(a.metrics_db_path) as store:
        store.log(1, "pretrain", {"train/loss": 5.0, "val/loss": 5.5, "other": 1.0})
        store.log(10, "pretrain", {"train/loss": 3.0, "val/bpb": 1.2})
        store.log(10, "rl", {"eval/arith/accuracy": 0.5, "eval/arith/n": 100})
        store.compact(a.metrics_parquet_path)
    with MetricStore(b.metrics_db_path) as store:
        store.log(1, "pretrain", {"train/loss": 4.0})
    a.metrics_db_path.unlink()  # the finished run keeps only its parquet

    listed = list_runs(runs)
    assert [r["name"] for r in listed] == ["b-first", "a-second"]
    assert listed[0]["status"] == "completed" and listed[0]["last_step"] == 10 and listed[0]["path"] == a.path
    assert listed[0]["metrics"] == {"train/loss": 3.0, "val/loss": 5.5, "val/bpb": 1.2, "eval/arith/accuracy": 0.5}
    assert listed[1]["metrics"] == {"train/loss": 4.0}


# ---- metrics -----------------------------------------------------------------------------------


def test_metric_store_log_read_pattern_last_series(tmp_path):
    with MetricStore(tmp_path / "m.db") as store:
        for step in range(5):
            store.log(
                step,
                "pretrain",
                {
                    "train/loss": torch.tensor(5.0 - step),
                    "lr": np.float32(0.5),
                    "attn_entropy/l0": step,
                    "attn_entropy/l1": 1,
                },
                time=100.0 + step,
            )
        store.log(0, "sft", {"train/loss": 1.0})
        assert store.names() == ["attn_entropy/l0", "attn_entropy/l1", "lr", "train/loss"]
        assert store.last("train/loss") == 1.0 and store.last("missing") is None

        t = store.read()
        assert t.schema == SCHEMA and t.num_rows == 21
        assert t.slice(0, 4)["name"].to_pylist() == ["attn_entropy/l0", "attn_entropy/l1", "lr", "train/loss"]
        assert t["stage"].to_pylist()[-1] == "sft"
        assert store.read(pattern="attn_entropy/*").num_rows == 10
        assert set(store.read(names=["lr"], pattern="attn_entropy/l1")["name"].to_pylist()) == {"lr", "attn_entropy/l1"}
        assert store.read(names=["nope"]).num_rows == 0
        assert store.read(["train/loss"], stage="sft")["value"].to_pylist() == [1.0]

        steps, values = store.series("train/loss", stage="pretrain")
        assert steps.dtype == np.int64 and values.dtype == np.float64
        np.testing.assert_array_equal(steps, [0, 1, 2, 3, 4])
        np.testing.assert_array_equal(values, [5.0, 4.0, 3.0, 2.0, 1.0])
        assert store.read(["train/loss"], stage="pretrain")["time"].to_pylist() == [100.0, 101.0, 102.0, 103.0, 104.0]


def test_metric_store_buffers_until_flush_and_concurrent_reader(tmp_path):
    path = tmp_path / "metrics.db"
    writer = MetricStore(path, flush_seconds=3600)
    writer.log(1, "pretrain", {"a": 1.0, "b": 2.0})
    writer.flush()
    writer.log(2, "pretrain", {"a": 3.0})  # still in the writer's buffer

    raw = sqlite3.connect(path)
    assert raw.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 2
    other = MetricStore(path)
    assert other.read()["value"].to_pylist() == [1.0, 2.0] and other.last("a") == 1.0

    # A separate process reads committed rows while the writer holds an open write transaction.
    raw_writer = sqlite3.connect(path, isolation_level=None)
    raw_writer.execute("BEGIN IMMEDIATE")
    raw_writer.execute("INSERT INTO metrics VALUES (9, 'x', 'uncommitted', 0, 0)")
    script = (
        f"import sqlite3; print(sqlite3.connect({str(path)!r}).execute('SELECT COUNT(*) FROM metrics').fetchone()[0])"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=10, check=True)
    assert out.stdout.strip() == "2"
    assert other.read().num_rows == 2
    assert read_metrics(tmp_path).num_rows == 2  # opening a new store does not wait for the writer
    raw_writer.execute("ROLLBACK")

    assert writer.last("a") == 3.0  # the writer reads its own buffered writes
    assert other.read(["a"])["value"].to_pylist() == [1.0, 3.0]
    writer.log(3, "pretrain", {"a": 4.0})
    writer.close()  # close flushes
    assert other.last("a") == 4.0
    other.close()
    raw.close()
    raw_writer.close()


def test_metric_store_flushes_by_row_count(tmp_path):
    path = tmp_path / "m.db"
    store = MetricStore(path, flush_every=10, flush_seconds=3600)
    raw = sqlite3.connect(path)
    store.log(0, "s", {f"v{i}": i for i in range(9)})
    assert raw.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 0
    store.log(1, "s", {"x": 1.0})
    assert raw.execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 10
    store.close()
    raw.close()


def test_nan_inf_round_trip(tmp_path):
    with MetricStore(tmp_path / "m.db") as store:
        store.log(
            0, "s", {"nan": float("nan"), "inf": float("inf"), "ninf": -math.inf, "tnan": torch.tensor(float("nan"))}
        )
        v = dict(zip(store.read()["name"].to_pylist(), store.read()["value"].to_pylist()))
        assert math.isnan(store.last("nan")) and store.last("ninf") == -math.inf
        assert np.isnan(store.series("tnan")[1]).all()
        store.compact(tmp_path / "m.parquet")
    assert math.isnan(v["nan"]) and math.isnan(v["tnan"]) and v["inf"] == math.inf and v["ninf"] == -math.inf
    p = dict(zip(*pq.read_table(tmp_path / "m.parquet").select(["name", "value"]).to_pydict().values()))
    assert math.isnan(p["nan"]) and p["inf"] == math.inf and p["ninf"] == -math.inf


def test_compact_schema_and_order(tmp_path):
    with MetricStore(tmp_path / "metrics.db") as store:
        store.log(5, "sft", {"b": 1.0, "a": 2.0})
        store.log(1, "sft", {"a": 3.0})  # out of order on purpose
        store.log(0, "rl", {"a": 4.0})
        store.compact(tmp_path / "metrics.parquet")
    table = pq.read_table(tmp_path / "metrics.parquet")
    assert table.schema.remove_metadata() == SCHEMA
    assert [f.type for f in table.schema] == [pa.int64(), pa.string(), pa.string(), pa.float64(), pa.float64()]
    assert table.select(["step", "stage", "name"]).to_pylist() == [
        {"step": 1, "stage": "sft", "name": "a"},
        {"step": 5, "stage": "sft", "name": "a"},
        {"step": 5, "stage": "sft", "name": "b"},
        {"step": 0, "stage": "rl", "name": "a"},
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.db", "metrics.parquet"]
    # metrics.db and metrics.parquet give the same table, filters included
    from_db = read_metrics(tmp_path, pattern="a", stage="sft")
    (tmp_path / "metrics.db").unlink()
    assert read_metrics(tmp_path, pattern="a", stage="sft").equals(from_db)
    assert read_metrics(tmp_path).num_rows == 4
    (tmp_path / "metrics.parquet").unlink()
    assert read_metrics(tmp_path).schema == SCHEMA and read_metrics(tmp_path).num_rows == 0


def test_truncate_after(tmp_path):
    with MetricStore(tmp_path / "m.db") as store:
        for step in range(10):
            store.log(step, "pretrain", {"loss": float(step)})
        store.log(3, "sft", {"loss": 0.0})
        store.truncate_after("pretrain", 4)
        steps, _ = store.series("loss", stage="pretrain")
        np.testing.assert_array_equal(steps, [0, 1, 2, 3, 4])
        assert store.series("loss", stage="sft")[0].tolist() == [3]


# ---- checkpoints -------------------------------------------------------------------------------


class TinyLM(torch.nn.Module):
    """Embedding tied to the output head, like the real model, to exercise shared storage."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 8)
        self.mlp = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mlp(self.emb(x))))


def _train(model, opt, steps, gen):
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 6), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(1, 1).flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _save(root, stage, step, model, opt, keep_last=3, **extra):
    return save_checkpoint(
        root,
        stage,
        step,
        model=model.state_dict(),
        optimizer=opt.state_dict(),
        extra={"step": step, **extra},
        rng={"torch_cpu": torch.get_rng_state()},
        keep_last=keep_last,
    )


def test_checkpoint_round_trip_continues_bit_identically(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    _train(model, opt, 3, gen)
    path = _save(tmp_path / "ckpt", "pretrain", 3, model, opt, sampler={"epoch": 0, "offset": 12})
    assert path == tmp_path / "ckpt" / "pretrain" / "step-0000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "COMPLETE",
        "extra.safetensors",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]
    gen_state = gen.get_state()

    ckpt = load_checkpoint(path)
    assert (ckpt.stage, ckpt.step, ckpt.extra) == ("pretrain", 3, {"step": 3, "sampler": {"epoch": 0, "offset": 12}})
    assert torch.equal(ckpt.rng["torch_cpu"], torch.get_rng_state())
    assert ckpt.optimizer["param_groups"][0]["betas"] == (0.8, 0.95)
    assert isinstance(next(iter(ckpt.optimizer["state"])), int)

    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    model2 = TinyLM()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0)
    model2.load_state_dict(ckpt.model)
    opt2.load_state_dict(ckpt.optimizer)
    assert model2.head.weight is model2.emb.weight
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]

    _train(model, opt, 3, gen)
    _train(model2, opt2, 3, torch.Generator().set_state(gen_state))
    for (name, p1), (_, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p1, p2), name


def test_checkpoint_extra_keeps_tensors_tuples_and_int_keys(tmp_path):
    """Hook state goes into `extra` and comes back exactly; a checkpoint from before `extra` held tensors loads."""
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters())
    window = torch.tensor([1.5, float("nan"), -2.0], dtype=torch.float64)
    hooks = {"SpikeProbe.0": {"window": window, "pair": (1, "a"), "by_step": {3: [0.25]}, "loss": float("nan")}}
    path = _save(tmp_path, "pretrain", 1, model, opt, hooks=hooks)
    back = load_checkpoint(path).extra["hooks"]["SpikeProbe.0"]
    assert torch.equal(back["window"].nan_to_num(7.0), window.nan_to_num(7.0)) and back["window"].dtype == torch.float64
    assert back["pair"] == (1, "a") and back["by_step"] == {3: [0.25]} and math.isnan(back["loss"])

    older = _save(tmp_path, "pretrain", 2, model, opt, sampler={"epoch": 0})
    (older / "extra.safetensors").unlink()
    assert load_checkpoint(older).extra == {"step": 2, "sampler": {"epoch": 0}}


def test_keep_last_prunes_and_latest(tmp_path):
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "ckpt"
    assert latest_checkpoint(root) is None and latest_checkpoint(root, "pretrain") is None
    for step in (10, 20, 30, 40):
        _save(root, "pretrain", step, model, opt, keep_last=2)
    assert sorted(p.name for p in (root / "pretrain").iterdir()) == ["step-0000030", "step-0000040"]
    assert latest_checkpoint(root, "pretrain").name == "step-0000040"
    _save(root, "pretrain", 40, model, opt, keep_last=2, again=True)  # re-saving a step replaces it
    assert load_checkpoint(root / "pretrain" / "step-0000040").extra["again"] is True
    assert sorted(p.name for p in (root / "pretrain").iterdir()) == ["step-0000030", "step-0000040"]

    _save(root, "sft", 5, model, opt)
    assert latest_checkpoint(root).parent.name == "sft"
    assert latest_checkpoint(root, "pretrain").name == "step-0000040"
    assert latest_checkpoint(root, "rl") is None


def test_interrupted_save_is_ignored_and_cleaned(tmp_path):
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / "ckpt"
    _save(root, "pretrain", 10, model, opt)
    tmp = root / "pretrain" / ".tmp-step-0000020"  # a save killed halfway
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    no_marker = root / "pretrain" / "step-0000030"  # complete-looking name, no marker
    no_marker.mkdir()
    assert latest_checkpoint(root, "pretrain").name == "step-0000010"
    assert latest_checkpoint(root).name == "step-0000010"
    with pytest.raises(GlasslabError, match="corrupt or incomplete .*COMPLETE"):
        load_checkpoint(no_marker)
    with pytest.raises(TypeError):  # extra must be JSON values and tensors: fails before writing anything
        _save(root, "pretrain", 20, model, opt, bad=object())
    assert sorted(p.name for p in (root / "pretrain").iterdir()) == ["step-0000010", "step-0000030"]
    _save(root, "pretrain", 20, model, opt)
    assert not tmp.exists() and latest_checkpoint(root, "pretrain").name == "step-0000020"


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters())
    _train(model, opt, 1, torch.Generator().manual_seed(0))
    path = _save(tmp_path, "pretrain", 1, model, opt)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(GlasslabError, match=r"corrupt or incomplete .*delete it to resume from the previous one") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)
    weights.unlink()
    with pytest.raises(GlasslabError, match="missing model.safetensors"):
        load_checkpoint(path)
    with pytest.raises(GlasslabError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("name", "why"),
    [("", "empty"), ("..", "relative"), (".", "relative"), ("a/b", "separator"), ("a\\b", "separator")]
    + [("-x", "starts with '-'"), ("a\tb", "control character")],
)
def test_a_run_name_is_one_path_component(name: str, why: str):
    with pytest.raises(GlasslabError, match=why):
        check_run_name(name)
    assert check_run_name("lr=3e-3_seed.0") == "lr=3e-3_seed.0"
