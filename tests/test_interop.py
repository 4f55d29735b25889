"""Hugging Face interop: imported models compute transformers' logits, the chat template renders and masks
conversations, an imported run fine-tunes and evaluates, exports load back into transformers unchanged, and
glasslab's attention and loss instruments agree with values computed from transformers' eager attention."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from glasslab.errors import GlasslabError
from glasslab.interop.hf_import import read_checkpoint
from glasslab.model.gpt import GPT

pytest.importorskip("transformers")
import hf_models  # noqa: E402  (tests/, on sys.path under pytest)

TOL = 1e-4


def glasslab_logits(directory, ids: torch.Tensor) -> torch.Tensor:
    imported = read_checkpoint(directory)
    model = GPT(imported.config.model)
    model.load_state_dict(imported.state)
    with torch.no_grad():
        return model.eval()(ids)


ARCHITECTURES = {
    # Llama 3: GQA, untied head, Llama 3 RoPE scaling, sharded safetensors
    "llama3": dict(
        kind="llama", shard=True, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    ),
    "smollm": dict(kind="llama", tie_word_embeddings=True),  # SmolLM's shape: Llama with tied embeddings
    "mistral": dict(kind="mistral", sliding_window=None, tie_word_embeddings=False),
    "qwen2": dict(kind="qwen2", tie_word_embeddings=True),  # q/k/v biases
    "qwen3": dict(kind="qwen3", head_dim=32, tie_word_embeddings=False),  # QK-norm, head_dim != width / heads
}  # fmt: skip


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_imported_logits_equal_transformers(arch, tmp_path, one_thread):
    options = dict(ARCHITECTURES[arch])
    hf = hf_models.build(options.pop("kind"), tmp_path, **options)
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
    got = glasslab_logits(tmp_path, ids)
    print(f"{arch}: max |logit difference| {(got - expected).abs().max():.2e}", file=sys.stderr)
    assert expected.abs().max() > 1  # the weights are visible: a wrong layout would not hide in rounding
    assert torch.allclose(got, expected, atol=TOL, rtol=0)


def test_bfloat16_checkpoints_import_as_float32(tmp_path, one_thread):
    hf = hf_models.build("llama", tmp_path, bf16=True)
    ids = torch.randint(0, hf.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(glasslab_logits(tmp_path, ids), hf(ids).logits, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    ("kind", "options", "named"),
    [
        ("mistral", dict(sliding_window=16), "sliding_window"),
        ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "yarn"),
        ("llama", dict(attention_bias=True), "attention_bias"),
        ("llama", dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_unrepresentable_options_are_refused_by_name(kind, options, named, tmp_path, one_thread):
    hf_models.build(kind, tmp_path, **options)
    with pytest.raises(GlasslabError, match=named):
        read_checkpoint(tmp_path)


# ---- tokenizer and chat template ------------------------------------------------------------------------------


def imported_run(tmp_path, kind: str = "llama", **options):
    from glasslab.interop.hf_import import import_checkpoint
    from glasslab.track.rundir import RunDir

    source = tmp_path / f"hf-{kind}"
    hf = hf_models.build(kind, source, **options)
    run = RunDir.create(tmp_path / "runs" / f"imported-{kind}")
    import_checkpoint(source, run, read_checkpoint(source))
    return run, source, hf


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # a Llama 3 template with a BOS, and ChatML without one
def test_template_renders_like_transformers_and_trains_exactly_the_assistant_turns(kind, tmp_path, one_thread):
    from transformers import AutoTokenizer

    from glasslab.chat.format import END, Message, render, render_prompt
    from glasslab.stages.common import load_model
    from glasslab.train.evaluate import completion_text

    run, source, _ = imported_run(tmp_path, kind)
    _, tok, _ = load_model(run)
    theirs = AutoTokenizer.from_pretrained(source)
    conversation = [
        Message("system", "Be brief."),
        Message("user", "12+30="),
        Message("assistant", "42"),
        Message("user", "Capital of France?"),
        Message("assistant", "Paris."),
    ]
    as_dicts = [{"role": m.role, "content": m.content} for m in conversation]
    ids, trained = render(conversation, tok)
    assert ids == theirs.apply_chat_template(as_dicts, tokenize=True, return_dict=False)
    end = tok.hf.id_to_token(tok.end_id)
    assert end == {"llama": "<|eot_id|>", "qwen2": "<|im_end|>"}[kind]
    assert tok.decode([i for i, t in zip(ids, trained) if t]) == f"42{end}Paris.{end}"
    prompt = render_prompt(conversation[:2], tok)
    assert prompt == theirs.apply_chat_template(
        as_dicts[:2], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert completion_text(tok, [*tok.encode("42"), tok.end_id, *tok.encode("x")]) == f"42{END}"
    assert tok.pad_id not in ids and tok.pad_id != tok.end_id  # padding never hides a real token
    with pytest.raises(GlasslabError, match="calculator"):
        render([Message("user", "1+1"), Message("tool", "2")], tok)


def test_an_imported_run_fine_tunes_evaluates_and_chats(tmp_path, one_thread):
    from typer.testing import CliRunner

    from glasslab.cli import app
    from glasslab.track.rundir import RunDir

    source = tmp_path / "hf"
    hf_models.build("llama", source)
    runs = tmp_path / "runs"

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    invoke("import-hf", source, "--name", "base", "--runs-dir", runs, "--json")
    sets = ["sft.train.steps=2", "sft.examples=16", "sft.val_examples=4", "sft.eval_n=2", "sft.train.batch_size=4",
            "sft.max_new_tokens=4", "system.threads=1", "probes.mode=full"]  # fmt: skip
    invoke("sft", runs / "base", "--preset", "smoke", "--tasks", "arithmetic", "--name", "sft", "--runs-dir", runs,
           *[x for kv in sets for x in ("--set", kv)])  # fmt: skip
    run = RunDir.open(runs / "sft")
    assert run.read_manifest()["init"].endswith("pretrain/step-0000000")
    from glasslab.track.metrics import read_metrics

    names = set(read_metrics(run.path, stage="sft")["name"].to_pylist())
    assert {"train/loss", "val/loss", "attn_entropy/blocks.0.h0", "eval/arithmetic/accuracy"} <= names
    result = json.loads(invoke("eval", run.path, "--task", "arithmetic", "--n", "3", "--samples", "0", "--json").stdout)
    assert result["n"] == 3 and 0 <= result["accuracy"] <= 1
    said = json.loads(invoke("chat", run.path, "--prompt", "1+2=", "--max-new-tokens", "3", "--json").stdout)
    assert set(said) == {"prompt", "reply", "checkpoint", "stage", "step"} and said["stage"] == "sft"


def test_import_without_jinja2_names_the_extra(tmp_path, monkeypatch, one_thread):
    hf_models.build("llama", tmp_path)
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(GlasslabError, match=r"pip install 'glasslab\[hf\]'"):
        read_checkpoint(tmp_path)


# ---- export ---------------------------------------------------------------------------------------------------


def glasslab_run(path, model: dict, steps: int = 0):
    """A run of glasslab's own: pretrained for `steps` on the embedded corpus with every probe on, or (steps=0) a
    random checkpoint with visible weights and a small trained tokenizer."""
    from glasslab.config import build_config
    from glasslab.data.tokenizer import Tokenizer
    from glasslab.stages.pretrain import pretrain
    from glasslab.track.atomic import write_text_atomic
    from glasslab.track.checkpoint import save_checkpoint
    from glasslab.track.rundir import RunDir

    cfg = build_config(
        {
            "model": {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64, "block_size": 32, **model},
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
            "data": {"max_chars": 20000},
            "train": {"steps": steps or 1, "batch_size": 4, "warmup_steps": 0, "eval_every": steps or 1,
                      "eval_batches": 2, "checkpoint_every": steps or 1},
            "probes": {"mode": "full", "position_windows": 8},
            "system": {"threads": 1, "precision": "float32"},
        }
    )  # fmt: skip
    run = RunDir.create(path)
    if steps:
        pretrain(cfg, run)
        return run, cfg
    tok = Tokenizer.train([hf_models.TEXT], "bpe", 300)
    tok.save(run.tokenizer_path)
    cfg.model.vocab_size = tok.vocab_size
    write_text_atomic(run.config_path, cfg.to_toml())
    torch.manual_seed(0)
    state = hf_models.visible(GPT(cfg.model)).state_dict()
    save_checkpoint(run.checkpoints_dir, "pretrain", 1, model=state, optimizer={}, rng={},
                    extra={"arch": cfg.model.model_dump()}, keep_last=1)  # fmt: skip
    return run, cfg


@pytest.mark.parametrize(
    ("model", "architecture"),
    [
        ({"mlp": "swiglu", "qk_norm": False, "tie_embeddings": False, "norm_eps": 1e-5}, "LlamaForCausalLM"),
        ({"mlp": "swiglu", "mlp_hidden": 96}, "Qwen3ForCausalLM"),  # QK-norm on, torch's default epsilon
    ],
)
def test_export_loads_in_transformers_with_equal_logits_and_greedy_generations(
    model, architecture, tmp_path, one_thread
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glasslab.chat.format import Message, render_prompt
    from glasslab.interop.hf_export import export_run
    from glasslab.model.generate import generate
    from glasslab.stages.common import load_model

    run, _ = glasslab_run(tmp_path / "run", model)
    out = tmp_path / "export"
    export_run(run, None, out)
    ours, tok, _ = load_model(run)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == architecture
    ids = torch.randint(0, tok.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = theirs(ids).logits, ours(ids)
    print(f"export {architecture}: max |logit difference| {(got - expected).abs().max():.2e}", file=sys.stderr)
    assert expected.abs().max() > 1 and torch.allclose(got, expected, atol=TOL, rtol=0)

    conversation = [Message("user", "Paris is the capital of")]
    prompt = render_prompt(conversation, tok)
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert prompt == hf_tok.apply_chat_template(
        [{"role": "user", "content": conversation[0].content}], add_generation_prompt=True, return_dict=False
    )
    mine = generate(ours, [prompt], 12, temperature=0.0, stop_ids=(tok.end_id,), pad_id=tok.pad_id, seed=0).tokens[0]
    with torch.no_grad():
        greedy = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
    assert mine == greedy.tolist()


def test_export_refuses_what_no_standard_architecture_expresses(tmp_path, one_thread):
    from glasslab.interop.hf_export import export_run

    run, _ = glasslab_run(tmp_path / "run", {"mlp": "relu2"})
    with pytest.raises(GlasslabError, match="model.mlp"):
        export_run(run, None, tmp_path / "export")
    assert not (tmp_path / "export").exists()


# ---- the instruments, against transformers --------------------------------------------------------------------


def test_logged_instruments_match_transformers_eager_attention(tmp_path, one_thread):
    """A pretrained smoke model, exported: each head's attention entropy, max logit and <|bos|> mass on the probe
    rows, the loss by position and val/loss, recomputed from transformers' eager attention, equal the logged ones."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.qwen3.modeling_qwen3 import eager_attention_forward

    from glasslab.data.tokenizer import Tokenizer
    from glasslab.data.tokens import build_token_splits
    from glasslab.interop.hf_export import export_run
    from glasslab.objectives.lm import LanguageModeling
    from glasslab.probes.positions import bucket_name, position_buckets
    from glasslab.stages.common import documents
    from glasslab.track.metrics import read_metrics

    run, cfg = glasslab_run(tmp_path / "runs" / "lm", {"mlp": "swiglu"}, steps=3)
    export_run(run, None, tmp_path / "export")
    scores: dict[int, torch.Tensor] = {}

    def recording(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        keys = key.repeat_interleave(query.size(1) // key.size(1), dim=1)
        scores[module.layer_idx] = (query @ keys.transpose(2, 3)) * scaling  # pre-softmax logits
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    AttentionInterface.register("recording_eager", recording)
    AttentionMaskInterface.register("recording_eager", eager_mask)  # eager's additive causal mask
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="recording_eager").eval()

    tok = Tokenizer.load(run.tokenizer_path)
    splits = build_token_splits(documents(cfg), tok, run.token_cache_dir, cfg.data.val_fraction, cfg.seed)
    objective = LanguageModeling(
        splits, tok, batch_size=cfg.train.batch_size, block_size=cfg.model.block_size,
        eval_batches_n=cfg.train.eval_batches, z_loss=0.0, seed=cfg.seed, device=torch.device("cpu"),
    )  # fmt: skip
    logged = {
        r["name"]: r["value"]
        for r in read_metrics(run.path, stage="pretrain").to_pylist()
        if r["step"] == cfg.train.steps
    }
    expected: dict[str, float] = {}

    rows = objective.probe_inputs()
    with torch.no_grad():
        attentions = hf(rows, output_attentions=True).attentions
    bos = rows == tok.bos_id  # probe rows are whole windows: no padding
    T = rows.size(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer, probs in enumerate(attentions):  # (B, H, T, T)
        queries = torch.arange(T) >= 1  # query 0 sees one key: out of the means
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)[:, :, queries].mean((0, 2))
        max_logit = scores[layer].masked_fill(~causal, float("-inf")).amax((0, 2, 3))
        sink = (probs * bos[:, None, None, :]).sum(-1)  # (B, H, T)
        sees = (bos.cumsum(1) > 0) & queries  # queries with a <|bos|> key in view
        for h in range(probs.size(1)):
            expected[f"attn_entropy/blocks.{layer}.h{h}"] = float(entropy[h])
            expected[f"attn_max_logit/blocks.{layer}.h{h}"] = float(max_logit[h])
            expected[f"attn_bos/blocks.{layer}.h{h}"] = float(sink[:, h][sees].mean())

    def token_losses(batches) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([torch.nn.functional.cross_entropy(
                hf(x).logits.transpose(1, 2), y, reduction="none", ignore_index=-100) for x, y in batches])  # fmt: skip

    expected["val/loss"] = float(token_losses(objective.val_batches()).mean())
    windows = token_losses(objective.position_batches(cfg.probes.position_windows))
    for first, last in position_buckets(windows.size(1)):
        name = bucket_name(first, last, windows.size(1))
        expected[name] = float(windows[:, first : last + 1].mean())

    assert bos.any() and len(expected) == 3 * 2 * 4 + 1 + len(position_buckets(windows.size(1)))
    differences = {name: abs(logged[name] - value) for name, value in expected.items()}
    worst = max(differences, key=differences.get)
    print(f"instruments: worst |difference| {differences[worst]:.2e} ({worst})", file=sys.stderr)
    assert differences[worst] < TOL
