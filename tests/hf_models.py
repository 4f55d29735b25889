"""Small random Hugging Face checkpoints built locally with transformers, for the interop tests: a byte-level BPE
tokenizer trained on a few sentences, wrapped with a chat template, and Llama/Qwen models with visible weights."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = "The quick brown fox jumps over the lazy dog. 0123456789 +-*= Paris is the capital of France. " * 4
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|reserved_special_token_0|>"]  # fmt: skip
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_pad|>"]


def save_tokenizer(directory: Path, style: str = "llama", vocab_size: int = 300) -> int:
    """A tokenizer with a chat template saved the way transformers saves one; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = LLAMA_SPECIALS if style == "llama" else CHATML_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([TEXT], trainer)
    tok.add_special_tokens(specials)
    if style == "llama":
        names = dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA_TEMPLATE)
    else:
        names = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)
    PreTrainedTokenizerFast(tokenizer_object=tok, **names).save_pretrained(directory)
    return tok.get_vocab_size()


def visible(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that a wrong layout changes the logits by far more than rounding: matrices
    N(0, 0.15), norm gains 1 + N(0, 0.2), biases N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.15 if p.dim() == 2 else (1 + 0.2 * noise if "norm" in name else 0.2 * noise))
    return model


def build(kind: str, directory: Path, shard: bool = False, bf16: bool = False, **options) -> torch.nn.Module:
    """A random 2-layer model of one architecture with a matching tokenizer, saved to `directory` (in shards, or
    as bfloat16, when asked); returns the float32 model as transformers loads it back from there."""
    import transformers

    style = "llama" if kind in ("llama", "mistral") else "chatml"
    vocab = save_tokenizer(directory, style)
    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=1000.0,
    )  # fmt: skip
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model = visible(model_cls(config_cls(**(common | options))))
    (model.to(torch.bfloat16) if bf16 else model).save_pretrained(
        directory, **({"max_shard_size": "60KB"} if shard else {})
    )
    return model_cls.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
