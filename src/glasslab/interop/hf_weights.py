"""Tensor names and layouts between Hugging Face's Llama/Qwen checkpoints and glasslab's GPT.

Two conventions differ besides the names:
- RoPE direction. glasslab rotates each pair of head halves (x1, x2) to (x1 cos + x2 sin, x2 cos - x1 sin); HF's
  `rotate_half` to (x1 cos - x2 sin, x2 cos + x1 sin), the opposite angle. Negating the second half of every q and
  k head turns one into the other (the flip commutes with the rotation's reflection and with RMSNorm, so QK-norm
  gains are unchanged), and the flip leaves every q·k score, hence the model, the same. It is its own inverse.
- SwiGLU. glasslab's MLP has one up-projection whose output halves are (value, gate); HF keeps up_proj (value)
  and gate_proj apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from glasslab.config import ModelConfig
from glasslab.errors import GlasslabError
from glasslab.model.gpt import head_dim

# glasslab name inside a block -> HF name inside `model.layers.i.`, for tensors that map one to one
_BLOCK = {
    "norm1.weight": "input_layernorm.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.v.bias": "self_attn.v_proj.bias",
    "attn.o.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}
_ROTATED = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj"}  # their output rows take the RoPE flip


def flip_rotary(t: Tensor, dim: int) -> Tensor:
    """Negate the second half of every head's rows of a q/k projection's weight (out, in) or bias (out,)."""
    heads = t.reshape(-1, 2, dim // 2, *t.shape[1:]).clone()
    heads[:, 1] = -heads[:, 1]
    return heads.reshape(t.shape)


def to_glasslab(hf: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """An HF state dict (float32) as glasslab's GPT state dict; a tensor it does not expect is refused."""
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # old checkpoints kept this buffer
    take = _taker(hf)
    dim = head_dim(cfg)
    out = {"wte.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    out["head.weight"] = out["wte.weight"] if cfg.tie_embeddings else take("lm_head.weight")
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    for i in range(cfg.n_layer):
        pre = f"model.layers.{i}."
        for ours, theirs in _BLOCK.items():
            if pre + theirs in hf:
                out[f"blocks.{i}.{ours}"] = take(pre + theirs)
        for ours, theirs in _ROTATED.items():
            for part in ("weight", "bias"):
                if pre + f"{theirs}.{part}" in hf:
                    out[f"blocks.{i}.{ours}.{part}"] = flip_rotary(take(pre + f"{theirs}.{part}"), dim)
        value, gate = take(pre + "mlp.up_proj.weight"), take(pre + "mlp.gate_proj.weight")
        out[f"blocks.{i}.mlp.up.weight"] = torch.cat([value, gate])
    if hf:
        raise GlasslabError(
            f"checkpoint tensor '{next(iter(hf))}' has no place in glasslab's GPT: import another model"
        )
    return out


def _taker(hf: dict[str, Tensor]):
    def take(name: str) -> Tensor:
        if name not in hf:
            raise GlasslabError(f"checkpoint has no tensor '{name}': pass a complete Llama/Qwen checkpoint directory")
        return hf.pop(name)

    return take


def to_hf(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """glasslab's GPT state dict as an HF Llama/Qwen state dict (the tied head stored once, as HF saves it)."""
    dim = head_dim(cfg)
    out = {"model.embed_tokens.weight": state["wte.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    for i in range(cfg.n_layer):
        pre, ours = f"model.layers.{i}.", f"blocks.{i}."
        out |= {pre + theirs: state[ours + name] for name, theirs in _BLOCK.items() if ours + name in state}
        for name, theirs in _ROTATED.items():
            for part in ("weight", "bias"):
                if f"{ours}{name}.{part}" in state:
                    out[f"{pre}{theirs}.{part}"] = flip_rotary(state[f"{ours}{name}.{part}"], dim)
        value, gate = state[ours + "mlp.up.weight"].chunk(2)
        out[pre + "mlp.up_proj.weight"], out[pre + "mlp.gate_proj.weight"] = value, gate
    return {k: v.detach().contiguous() for k, v in out.items()}


def read_safetensors(directory: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint directory (one model.safetensors, or shards listed by its index), as float32."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise GlasslabError(f"{directory} has no model.safetensors (or index): save the model with safetensors")
    out: dict[str, Tensor] = {}
    for name in files:
        out |= {k: v.float() for k, v in load_file(directory / name).items()}
    return out


def write_safetensors(state: dict[str, Tensor], path: Path) -> None:
    save_file(state, path, metadata={"format": "pt"})
