"""A whole modern GPT in one file: RoPE, RMSNorm, optional QK-norm, GQA, GELU/SwiGLU/ReLU² MLPs,
tied or untied embeddings and soft-capped logits. Attention runs through `F.scaled_dot_product_attention`.

The forward pass carries no instrumentation: probes attach forward hooks to named submodules
(`blocks.i.attn.core` sees q, k, v after RoPE and QK-norm; `blocks.i` sees the residual stream).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glasslab.config import ModelConfig


class Rotary(nn.Module):
    """Rotary position embedding tables, grown on demand so positions past block_size still work. They are stored
    as (cos, cos) and (sin, -sin), so that rotating a head is two products and a sum (`apply_rotary`)."""

    def __init__(self, head_dim: int, theta: float, length: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", theta ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)
        self._build(length)

    def _build(self, length: int) -> None:
        freqs = torch.outer(torch.arange(length, device=self.inv_freq.device).float(), self.inv_freq)
        cos, sin = freqs.cos(), freqs.sin()
        self.register_buffer("cos", torch.cat((cos, cos), dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat((sin, -sin), dim=-1), persistent=False)

    def forward(self, positions: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """positions: (T,) shared by every row, or (B, T), all below `length` (a Python int, so a compiled
        graph needs no data-dependent check). Returns cos, sin broadcastable to (B, H, T, D)."""
        if length > self.cos.size(0):
            self._build(2 * length)
        cos, sin = self.cos[positions], self.sin[positions]
        return (cos, sin) if positions.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x1[i], x2[i]) of the head's halves by its position's angle:
    (x1 cos + x2 sin, x2 cos - x1 sin), written as x·(cos, cos) + (x2, x1)·(sin, -sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((x2, x1), dim=-1) * sin).type_as(x)


class AttentionCore(nn.Module):
    """softmax(q kᵀ / √d + mask) v. Its own module so a probe can hook the exact q, k, v the model attends with."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # On CPU, SDPA's bf16 backward is ~5x slower than its float32 one: attend in float32.
            with torch.autocast("cpu", enabled=False):
                return _attend(q.float(), k.float(), v.float(), mask)
        return _attend(q, k, v, mask)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q = nn.Linear(cfg.n_embd, self.n_head * self.head_dim, bias=False)
        self.k = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.v = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.o = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if cfg.qk_norm else nn.Identity()
        self.core = AttentionCore()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: CacheLayer | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        # Norm and rotate in float32 (a no-op without autocast): bf16 inputs push rms_norm off its fused kernel.
        q, k = apply_rotary(self.q_norm(q.float()), cos, sin), apply_rotary(self.k_norm(k.float()), cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        y = self.core(q, k, v, mask)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def _relu2(h: Tensor) -> Tensor:
    r = F.relu(h)
    return r * r  # not r.square(): its backward goes through a pow kernel that is ~3x slower on CPU


def _swiglu(h: Tensor) -> Tensor:
    a, gate = h.chunk(2, dim=-1)
    return F.silu(gate) * a


# name -> (activation, how many hidden-width slices the up-projection produces)
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], int]] = {
    "gelu": (F.gelu, 1),
    "relu2": (_relu2, 1),
    "swiglu": (_swiglu, 2),
}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.act, width = ACTIVATIONS[cfg.mlp]
        # SwiGLU has three matrices: shrink its hidden width by 2/3 to keep the parameter count.
        hidden = int(cfg.mlp_ratio * cfg.n_embd * (2 / 3 if width == 2 else 1))
        self.up = nn.Linear(cfg.n_embd, width * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(cfg.n_embd), Attention(cfg)
        self.norm2, self.mlp = nn.RMSNorm(cfg.n_embd), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: CacheLayer | None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, mask, cache))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size must be set (it comes from the tokenizer)")
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.wte.weight
        self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.rope_theta, cfg.block_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual projections shrunk by √(2·n_layer) so the stream's variance stays flat."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=residual_std if name.endswith(("attn.o.weight", "mlp.down.weight")) else 0.02)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings or self.cfg.tie_embeddings else n - self.wte.weight.numel()

    def forward(
        self,
        idx: Tensor,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | PrefixCache | None = None,
        select: Tensor | None = None,
    ) -> Tensor:
        """idx (B, T) -> logits (B, T, V). `mask` is a boolean (B, 1, T, T_keys) attention mask (True = attend);
        without one, attention is causal. `positions` default to 0..T-1 after whatever the cache holds. `cache`:
        a KVCache (generation, no gradients) or a PrefixCache (rows continuing shared prompts, with gradients).
        `select`, (N,) indices into the flattened B·T positions, returns the logits of those positions only, (N, V):
        the head and the log-softmax after it are a large share of a small model's step (the head alone is a
        quarter of the FLOPs at width 128 and vocabulary 2048), and an RL loss needs the completion positions only."""
        if positions is None:
            start = cache.length if cache is not None else 0
            positions, length = torch.arange(start, start + idx.size(1), device=idx.device), start + idx.size(1)
        else:
            length = int(positions.max()) + 1
        cos, sin = self.rotary(positions, length)
        x = self.drop(self.wte(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, cache.layer(i) if cache is not None else None)
        if select is not None:
            x = x.flatten(0, 1).index_select(0, select)
        logits = self.head(self.norm(x)).float()
        if self.cfg.logit_softcap:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        if cache is not None:
            cache.length += idx.size(1)
        return logits


class LayerCache:
    """One layer's view of the KV cache: writes new keys/values at the cache's fill position."""

    def __init__(self, cache: KVCache, i: int) -> None:
        self.cache, self.i = cache, i

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        c, start, end = self.cache, self.cache.length, self.cache.length + k.size(2)
        c.k[self.i, :, :, start:end] = k
        c.v[self.i, :, :, start:end] = v
        return c.k[self.i, :, :, :end], c.v[self.i, :, :, :end]


class KVCache:
    """Preallocated keys and values for every layer, so generation attends to the past without recomputing it."""

    def __init__(self, model: GPT, batch: int, max_len: int) -> None:
        cfg, p = model.cfg, next(model.parameters())
        shape = (cfg.n_layer, batch, cfg.n_kv_head or cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.length = 0

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)

    def select(self, rows: Tensor) -> None:
        """Keep these batch rows, in this order, repeats allowed: generation prefills a prompt that several rows
        share once and then repeats it, and drops the rows that have finished."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


class PrefixCache:
    """The keys and values of a batch of prompts, kept in the autograd graph, for a second forward that continues
    row r from prompt `rows[r]`. Prompts that several rows share (a GRPO group) are computed once, and the
    gradients of every continuation flow back through them: the exact gradient of the full-sequence forward.
    The first forward through the cache stores; every later one attends to the stored prompts."""

    def __init__(self, rows: Tensor) -> None:
        self.rows, self.keys, self.values = rows, [], []
        self.length = 0

    def layer(self, i: int) -> PrefixLayer:
        return PrefixLayer(self, i)


class PrefixLayer:
    def __init__(self, cache: PrefixCache, i: int) -> None:
        self.cache, self.i = cache, i

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        c = self.cache
        if c.length == 0:
            c.keys.append(k)
            c.values.append(v)
            return k, v
        return torch.cat([c.keys[self.i][c.rows], k], dim=2), torch.cat([c.values[self.i][c.rows], v], dim=2)


CacheLayer = LayerCache | PrefixLayer  # what a block attends through: update(k, v) -> all keys, values
