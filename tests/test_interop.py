"""Hugging Face interop: imported models compute transformers' logits, the chat template renders and masks
conversations, an imported run fine-tunes and evaluates, exports load back into transformers unchanged, and
glasslab's attention and loss instruments agree with values computed from transformers' eager attention."""

from __future__ import annotations

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
