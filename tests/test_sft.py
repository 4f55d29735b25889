"""SFT: the trained-token mask and padding, conversation files, the objective's data order and resume,
the stage on a tiny base run, and the sft / eval / chat commands."""

import io
import json

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from glasslab.chat.conversations import load_conversations
from glasslab.chat.format import Message
from glasslab.chat.repl import TokenPrinter, fit_history
from glasslab.cli import app
from glasslab.config import ModelConfig, build_config
from glasslab.data.tokenizer import Tokenizer
from glasslab.data.tokens import build_token_splits
from glasslab.envs import get_env
from glasslab.errors import GlasslabError
from glasslab.model.gpt import GPT
from glasslab.objectives.sft import Example, pad_batch, to_example
from glasslab.stages.common import documents
from glasslab.stages.sft import build_objective, sft, shares
from glasslab.track.atomic import write_text_atomic
from glasslab.track.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from glasslab.track.metrics import read_metrics
from glasslab.track.rundir import RunDir

TEXT = "0123456789+-*/=() Reach with Use the calculator. error: not arithmetic Capital of France? Paris. Be brief."
MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], "char", 0)


def small_config(tok, **sft):
    return build_config(
        {
            "model": {**MODEL, "vocab_size": tok.vocab_size},
            "tokenizer": {"kind": "char"},
            "sft": {
                "tasks": ["arithmetic"],
                "examples": 64,
                "val_examples": 8,
                "eval_n": 4,
                "max_new_tokens": 4,
                "train": {
                    "steps": 4,
                    "batch_size": 4,
                    "warmup_steps": 0,
                    "schedule": "constant",
                    "eval_every": 0,
                    "checkpoint_every": 2,
                },
                **sft,
            },
            "eval": {"n": 8, "samples": 2, "pass_k": [1, 2], "max_new_tokens": 4},
            "system": {"threads": 1},
        }
    )


def base_run(path, tok):
    """A run with a tokenizer and a (random) pretrain checkpoint: what `glasslab pretrain` leaves behind."""
    cfg = small_config(tok)
    run = RunDir.create(path)
    tok.save(run.tokenizer_path)
    write_text_atomic(run.config_path, cfg.to_toml())
    torch.manual_seed(0)
    model = GPT(cfg.model)
    save_checkpoint(
        run.checkpoints_dir,
        "pretrain",
        1,
        model=model.state_dict(),
        optimizer={},
        rng={},
        extra={"arch": cfg.model.model_dump()},
        keep_last=1,
    )
    return run


# ---- format, padding, data -----------------------------------------------------------------------


def test_only_assistant_tokens_are_trained(tok):
    msgs = [Message("system", "Be brief."), Message("user", "1+2="), Message("assistant", "3")]
    e = to_example(msgs, tok)
    trained = tok.decode([i for i, t in zip(e.ids, e.trained) if t])
    assert trained == "3<|end|>"
    tool = [
        Message("user", "2*3="),
        Message("assistant", "<|tool_call|>2*3"),
        Message("tool", "6"),
        Message("assistant", "6"),
    ]
    e = to_example(tool, tok)
    assert tok.decode([i for i, t in zip(e.ids, e.trained) if t]) == "<|tool_call|>2*3<|end|>6<|end|>"


def test_padding_is_ignored_and_does_not_leak(tok):
    long, short = (
        Example([1, 4, 5, 6, 7, 8], [False, False, True, True, False, True]),
        Example([1, 4, 9], [False, True, True]),
    )
    x, y = pad_batch([long, short], tok.pad_id)
    assert x.tolist() == [[1, 4, 5, 6, 7], [1, 4, tok.pad_id, tok.pad_id, tok.pad_id]]
    assert y.tolist() == [[-100, 5, 6, -100, 8], [4, 9, -100, -100, -100]]
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=16))
    alone = model(x[1:, :2])
    assert torch.allclose(model(x)[1, :2], alone[0], atol=1e-5)  # right padding: causal attention never sees it


def test_shares_add_up():
    assert shares(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    assert shares(100, {"a": 3, "b": 1}) == {"a": 75, "b": 25}
    assert shares(7, {"a": 1, "b": 0}) == {"a": 7, "b": 0}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_conversation_file_errors_name_the_line(tmp_path, tok):
    good = {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]}
    loaded = load_conversations(write_jsonl(tmp_path / "ok.jsonl", [good, "", good]), tok, 65)
    assert len(loaded) == 2 and loaded[0][1] == Message("assistant", "Paris.")
    cases = [
        ([good, {"messages": [{"role": "robot", "content": "hi"}]}], "line 2: .*unknown role 'robot'"),
        ([good, good, {"messages": [{"role": "user", "content": "hi"}]}], "line 3: .*no assistant turn"),
        (["{not json"], "line 1"),
        (
            [{"messages": [{"role": "user", "content": "1" * 80}, {"role": "assistant", "content": "2"}]}],
            "line 1: .*tokens",
        ),
        ([{"messages": [{"role": "tool", "content": "6"}, {"role": "assistant", "content": "6"}]}], "line 1: .*tool"),
        ([{"text": "hello"}], "line 1: .*messages"),
    ]
    for rows, message in cases:
        with pytest.raises(GlasslabError, match=message):
            load_conversations(write_jsonl(tmp_path / "bad.jsonl", rows), tok, 65)


def test_env_conversations_that_do_not_fit_are_refused(tok):
    cfg = small_config(tok)
    cfg.envs["arithmetic"] = {"ops": ["*"], "min_digits": 9, "max_digits": 9}
    cfg.model.block_size = 16
    with pytest.raises(GlasslabError, match="task 'arithmetic'.*block_size"):
        build_objective(cfg, tok, torch.device("cpu"))


def test_data_order_is_deterministic_and_resumes_from_the_position(tok):
    cfg = small_config(tok, tasks=["arithmetic", "countdown"], weights={"countdown": 0.5})
    a, b = build_objective(cfg, tok, torch.device("cpu")), build_objective(cfg, tok, torch.device("cpu"))
    assert len(a.train) == 64 and sum(len(e.ids) > 14 for e in a.train) > 10  # countdown's prompts are longer
    first = [a.next_batch(None)[0] for _ in range(20)]  # 80 examples: crosses an epoch
    assert all(torch.equal(x, y) for x, y in zip(first, [b.next_batch(None)[0] for _ in range(20)]))
    c = build_objective(cfg, tok, torch.device("cpu"))
    c.load_state_dict(a.state_dict())
    assert torch.equal(a.next_batch(None)[0], c.next_batch(None)[0])
    other = build_objective(small_config(tok, examples=65), tok, torch.device("cpu"))
    with pytest.raises(GlasslabError, match="data differ"):
        other.load_state_dict(a.state_dict())


def test_length_bucketing_keeps_mixed_batches_from_padding(tok):
    """Short arithmetic and long tool-use conversations mixed: bucketed batches are mostly real tokens,
    and each epoch still visits every example once."""
    cfg = small_config(tok, tasks=["arithmetic", "calculator"], examples=512)
    cfg.sft.train.batch_size = 8
    objective = build_objective(cfg, tok, torch.device("cpu"))
    assert sorted(objective.epoch_order(0).tolist()) == list(range(512))
    batches = [objective.next_batch(None)[0] for _ in range(64)]
    padding = sum(int((x == tok.pad_id).sum()) for x in batches) / sum(x.numel() for x in batches)
    assert padding < 0.1
    # within a length class, 1- and 2-digit problems stay mixed (batches of one difficulty learn far slower)
    arithmetic = build_objective(small_config(tok, examples=512), tok, torch.device("cpu"))
    arithmetic.batch_size = 8
    lengths = [(x != tok.pad_id).sum(1) for x in (arithmetic.next_batch(None)[0] for _ in range(32))]
    assert sum(int(n.min()) <= 10 < int(n.max()) for n in lengths) >= 28


# ---- the stage and its resume --------------------------------------------------------------------


def test_sft_stage_trains_logs_and_resumes_exactly(tmp_path, tok):
    """A run stopped after its step-2 checkpoint and resumed ends with the same weights as one never stopped."""
    whole = base_run(tmp_path / "whole", tok)
    sft(small_config(tok), whole)
    names = set(read_metrics(whole.path)["name"].to_pylist())
    assert {"train/loss", "val/loss", "eval/arithmetic/accuracy", "eval/arithmetic/format"} <= names
    assert any(s["task"] == "arithmetic" for s in whole.samples())

    split = base_run(tmp_path / "split", tok)
    cfg = small_config(tok)
    cfg.sft.train.steps = 2
    sft(cfg, split)
    sft(small_config(tok), split)  # picks up the sft checkpoint at step 2
    a = load_checkpoint(latest_checkpoint(whole.checkpoints_dir, "sft"))
    b = load_checkpoint(latest_checkpoint(split.checkpoints_dir, "sft"))
    assert a.step == b.step == 4
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)


def test_sft_needs_a_pretrained_model(tmp_path, tok):
    run = RunDir.create(tmp_path / "empty")
    with pytest.raises(GlasslabError, match="tokenizer"):
        sft(small_config(tok), run)
    tok.save(run.tokenizer_path)
    with pytest.raises(GlasslabError, match="no pretrain checkpoint"):
        sft(small_config(tok), run)


# ---- commands ------------------------------------------------------------------------------------


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, (SystemExit, GlasslabError)):
        raise result.exception
    return result


def test_sft_eval_and_chat_commands(tmp_path, tok):
    base = base_run(tmp_path / "base", tok)
    sets = ["--set", "system.threads=1"] + [
        x
        for kv in (
            "sft.train.steps=2",
            "sft.examples=16",
            "sft.eval_n=2",
            "sft.train.batch_size=4",
            "sft.max_new_tokens=4",
        )
        for x in ("--set", kv)
    ]
    shown = invoke("sft", base.path, "--preset", "smoke", "--tasks", "calculator", "--show-example", "--json", *sets)
    [example] = json.loads(shown.stdout)
    assert "".join(t for t, trained in zip(example["tokens"], example["trained"]) if trained).startswith(
        "<|tool_call|>"
    )

    done = invoke(
        "sft",
        base.path,
        "--preset",
        "smoke",
        "--tasks",
        "arithmetic",
        "--name",
        "chat",
        "--runs-dir",
        tmp_path,
        "--json",
        *sets,
    )
    assert done.exit_code == 0, done.output
    run = RunDir.open(tmp_path / "chat")
    manifest = run.read_manifest()
    assert manifest["pipeline"] == ["sft"] and manifest["parent"] == str(base.path.resolve())
    assert manifest["init"].endswith("pretrain/step-0000001") and manifest["status"] == "completed"

    out = invoke(
        "eval", run.path, "--task", "arithmetic", "--n", "6", "--seed", "7", "--k", "1,2", "--samples", "2", "--json"
    )
    result = json.loads(out.stdout)
    assert set(result) == {"task", "n", "seed", "accuracy", "pass_at_k", "by_difficulty", "rewards", "diagnostics"} | {
        "checkpoint",
        "stage",
        "step",
    }
    assert "place/units" in result["diagnostics"]
    assert result["n"] == 6 and result["seed"] == 7 and set(result["pass_at_k"]) == {"1", "2"}
    assert len((run.path / "eval" / "arithmetic-seed7.jsonl").read_text().splitlines()) == 6
    logged = read_metrics(run.path, stage="eval")["name"].to_pylist()
    assert {"eval/arithmetic/accuracy", "eval/arithmetic/pass@2"} <= set(logged)
    unknown = invoke("eval", run.path, "--task", "nope").exception
    assert isinstance(unknown, GlasslabError) and "arithmetic, countdown, calculator" in str(unknown)

    said = invoke("chat", run.path, "--prompt", "1+2=", "--max-new-tokens", "3", "--json")
    assert set(json.loads(said.stdout)) == {"prompt", "reply", "checkpoint", "stage", "step"}
    bad = invoke("sft", base.path, "--data", tmp_path / "missing.jsonl", "--name", "x", "--runs-dir", tmp_path)
    assert isinstance(bad.exception, GlasslabError) and "not found" in str(bad.exception)


def test_chat_streams_tool_calls_readably_and_trims_history(tok):
    out = io.StringIO()
    printer = TokenPrinter(tok, Console(file=out, width=200))
    for i in tok.encode("<|tool_call|>12*34<|end|><|tool|>408<|end|><|assistant|>it is 408.<|end|>"):
        printer.feed([i])  # one token at a time, as generation streams them
    assert out.getvalue() == "[calculator: 12*34 = 408] it is 408."
    history = [
        Message("system", "Be brief."),
        *[Message(r, "1+2=" if r == "user" else "3") for r in ["user", "assistant"] * 6],
    ]
    kept = fit_history(history, tok, budget=30)
    assert kept[0].role == "system" and kept[1].role == "user" and kept[-1] == history[-1] and len(kept) < len(history)
    with pytest.raises(GlasslabError, match="does not fit"):
        fit_history([Message("user", "1" * 50)], tok, budget=30)


def test_env_options_come_from_the_config(tok):
    cfg = small_config(tok)
    cfg.envs["arithmetic"] = {"ops": ["*"]}
    objective = build_objective(cfg, tok, torch.device("cpu"))
    assert objective.envs["arithmetic"].options == get_env("arithmetic", {"ops": ["*"]}).options
    assert all("*" in tok.decode(e.ids) for e in objective.train)
    with pytest.raises(GlasslabError, match="weights"):
        small_config(tok, weights={"arithmetic": 0.0, "countdown": 1.0})  # nothing left for the listed task


def test_replay_adds_fully_trained_windows_of_pretraining_text(tok, tmp_path):
    cfg = small_config(tok, replay=0.2)
    cfg.data.max_chars = 20_000
    objective = build_objective(cfg, tok, torch.device("cpu"), tmp_path / "cache")
    text = [e for e in objective.train if all(e.trained)]
    assert len(objective.train) == 80 and len(text) == 16  # 64 conversations + a fifth of the set as text
    train = build_token_splits(documents(cfg), tok, tmp_path / "cache", cfg.data.val_fraction, cfg.seed).train
    stream, width = "," + ",".join(map(str, train.tolist())) + ",", cfg.model.block_size // 2 + 1
    for e in text:
        assert len(e.ids) == width and "," + ",".join(map(str, e.ids)) + "," in stream  # a window of the train split
    assert not any(all(e.trained) for e in build_objective(small_config(tok), tok, torch.device("cpu")).train)
    with pytest.raises(GlasslabError, match="pretraining token cache"):
        build_objective(cfg, tok, torch.device("cpu"))
