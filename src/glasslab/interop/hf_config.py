"""Hugging Face config.json <-> glasslab's ModelConfig, refusing what the other side cannot express.

Import reads the decoder-only families whose blocks are glasslab's (pre-norm RMSNorm, RoPE, GQA, SwiGLU): Llama
(SmolLM has its shapes), Mistral without a sliding window, Qwen2 (q/k/v biases) and Qwen3 (per-head QK-norm).
Export writes the standard architecture that expresses a config: Qwen3 when QK-norm is on, Qwen2 for q/k/v
biases, Llama otherwise.
"""

from __future__ import annotations

from typing import Any

import torch

from glasslab.config import ModelConfig, RopeScaling
from glasslab.errors import GlasslabError
from glasslab.model.gpt import head_dim

IMPORTABLE = ("llama", "mistral", "qwen2", "qwen3")
# The context glasslab trains in (model.block_size) unless the checkpoint's is shorter; the model attends further.
DEFAULT_BLOCK_SIZE = 2048


def model_config_from_hf(hf: dict[str, Any], block_size: int = DEFAULT_BLOCK_SIZE) -> ModelConfig:
    """The ModelConfig of an HF config.json, or a GlasslabError naming the first option glasslab cannot represent."""
    kind = hf.get("model_type")
    if kind not in IMPORTABLE:
        raise GlasslabError(f"model_type '{kind}' is not supported: import-hf reads {', '.join(IMPORTABLE)}")
    _refuse_options(hf, kind)
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    dim = hf.get("head_dim") or n_embd // n_head
    theta, scaling = _rope(hf)
    return ModelConfig(
        n_layer=hf["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=n_embd,
        head_dim=None if dim * n_head == n_embd else dim,
        block_size=min(hf.get("max_position_embeddings", block_size), block_size),
        mlp="swiglu",
        mlp_hidden=hf["intermediate_size"],
        qk_norm=kind == "qwen3",
        attn_bias=kind == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", kind != "mistral")),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        vocab_size=hf["vocab_size"],
    )


def _refuse_options(hf: dict[str, Any], kind: str) -> None:
    checks = [
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act '{hf.get('hidden_act')}' (glasslab's SwiGLU uses silu)"),
        (bool(hf.get("mlp_bias")), "mlp_bias (glasslab's MLP has no biases)"),
        (kind != "qwen2" and bool(hf.get("attention_bias")), "attention_bias (o_proj biases are not supported)"),
        (kind == "mistral" and hf.get("sliding_window") is not None, "sliding_window (full attention only)"),
        (kind.startswith("qwen") and bool(hf.get("use_sliding_window")), "use_sliding_window (full attention only)"),
        (bool(hf.get("layer_types")) and set(hf["layer_types"]) != {"full_attention"}, "layer_types (full only)"),
    ]
    for bad, what in checks:
        if bad:
            raise GlasslabError(f"{kind} option {what} cannot be represented in glasslab's GPT: import another model")


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and the scaling: transformers 4 writes `rope_theta` and `rope_scaling`, 5 `rope_parameters`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise GlasslabError(f"rope_type '{kind}' cannot be represented in glasslab's GPT: it supports default, llama3")
    return theta, RopeScaling(
        factor=params["factor"],
        low_freq_factor=params["low_freq_factor"],
        high_freq_factor=params["high_freq_factor"],
        original_context=params["original_max_position_embeddings"],
    )


def export_architecture(cfg: ModelConfig) -> str:
    """The model_type that expresses `cfg`, or a GlasslabError naming the option none does."""
    if cfg.mlp != "swiglu":
        raise GlasslabError(
            f"model.mlp = '{cfg.mlp}' has no standard Hugging Face architecture (Llama and Qwen use swiglu): "
            "export a model trained with --set model.mlp=swiglu"
        )
    if cfg.logit_softcap:
        raise GlasslabError("model.logit_softcap has no standard Hugging Face architecture: export a model without it")
    if cfg.qk_norm and cfg.attn_bias:
        raise GlasslabError("model.attn_bias with model.qk_norm has no standard Hugging Face architecture")
    if cfg.attn_bias and head_dim(cfg) * cfg.n_head != cfg.n_embd:
        raise GlasslabError("model.attn_bias with model.head_dim != n_embd / n_head has no standard architecture")
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.attn_bias else "llama"


def hf_config_from_model(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    """config.json for `cfg` under its export architecture (see export_architecture)."""
    kind = export_architecture(cfg)
    hidden = cfg.mlp_hidden or int(cfg.mlp_ratio * cfg.n_embd * 2 / 3)
    out: dict[str, Any] = {
        "architectures": [
            {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[kind]
        ],
        "model_type": kind,
        "hidden_size": cfg.n_embd,
        "intermediate_size": hidden,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head or cfg.n_head,
        "head_dim": head_dim(cfg),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        # None is torch's RMSNorm default: the machine epsilon of the dtype (float32's, for the exported weights).
        "rms_norm_eps": cfg.norm_eps if cfg.norm_eps is not None else torch.finfo(torch.float32).eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_scaling(cfg.rope_scaling),
        "tie_word_embeddings": cfg.tie_embeddings,
        "vocab_size": cfg.vocab_size,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }
    if kind == "llama":
        out["mlp_bias"] = False
    else:
        out |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer}
    return out


def _rope_scaling(s: RopeScaling | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {
        "rope_type": s.kind,
        "factor": s.factor,
        "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_context,
    }
