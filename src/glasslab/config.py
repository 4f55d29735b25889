"""One resolved Config per run: defaults <- preset TOML <- user TOML <- `--set a.b=value`.

Every section is a strict pydantic model, so a typo is an error that names the nearest valid key
instead of a silently ignored setting.
"""

from __future__ import annotations

import difflib
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from glasslab.errors import GlasslabError

PRESETS = ("smoke", "tiny", "small", "gpt2-124m")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: same as n_head; fewer heads = grouped-query attention
    n_embd: int = 128
    block_size: int = 128
    mlp: Literal["gelu", "swiglu", "relu2"] = "relu2"
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    tie_embeddings: bool = True
    logit_softcap: float | None = None
    rope_theta: float = 10000.0
    dropout: float = 0.0
    vocab_size: int | None = None  # filled from the tokenizer

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        kv = self.n_kv_head or self.n_head
        if self.n_embd % self.n_head or self.n_head % kv:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), "
                f"and n_head by n_kv_head ({kv})"
            )
        return self


class TokenizerConfig(Section):
    kind: Literal["bpe", "char"] = "bpe"
    vocab_size: int = 2048


class DataConfig(Section):
    source: str | None = None  # None: the embedded Shakespeare corpus
    text_field: str = "text"
    val_fraction: float = 0.05
    max_chars: int | None = None  # keep only the first documents up to this many characters (quick experiments)


class TrainConfig(Section):
    """One stage's optimisation: steps, batch, optimiser, schedule, and how often to evaluate and save."""

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-3
    muon_lr: float = 0.02  # for the hidden matrices when optimizer = "muon"; AdamW (lr) does the rest
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying at the end
    z_loss: float = 0.0
    eval_every: int = 100
    eval_batches: int = 8
    sample_every: int = 0  # 0: only at the end of the stage
    checkpoint_every: int = 200
    keep_last: int = 2


class SystemConfig(Section):
    device: str = "auto"  # auto: cuda when available, else cpu
    compile: bool = False
    threads: int | None = None  # None: torch's default


class ProbesConfig(Section):
    """Which probes run and how often (in steps). `--probes full` sets every cadence to 1; `off` disables all."""

    mode: Literal["off", "default", "full"] = "default"
    grads_every: int = 10
    attention_every: int = 50
    activations_every: int = 50
    loss_by_position: bool = True
    position_buckets: int = 8
    spikes: bool = True
    spike_window: int = 50
    spike_threshold: float = 6.0
    spike_history: int = 8
    spike_topk: int = 8


class SFTConfig(Section):
    """Supervised fine-tuning on chat conversations: made by task environments, or read from a JSONL file."""

    tasks: list[str] = ["arithmetic"]
    data: str | None = None  # a conversations JSONL instead of (or besides) the tasks
    examples: int = 20000
    train: TrainConfig = TrainConfig(steps=600, batch_size=32, lr=1e-3, warmup_steps=30, eval_every=200, checkpoint_every=200)


class RLConfig(Section):
    """Reinforcement learning from an environment's rewards: GRPO, or DPO on pairs built from it."""

    algo: Literal["grpo", "dpo"] = "grpo"
    env: str = "arithmetic"
    group_size: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 24
    temperature: float = 1.0
    beta: float = 0.04
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    eps_low: float = 0.2
    eps_high: float = 0.28
    num_iterations: int = 1
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = "dapo"
    mask_truncated: bool = True
    drop_zero_std: bool = True
    entropy_coef: float = 0.0
    reward_weights: dict[str, float] = {"correct": 1.0, "format": 0.1}
    ref_reset_every: int = 0  # 0: the reference stays the SFT model
    dpo_beta: float = 0.1
    eval_n: int = 200
    table_every: int = 25
    train: TrainConfig = TrainConfig(steps=150, batch_size=1, lr=5e-5, warmup_steps=5, weight_decay=0.0, eval_every=50, checkpoint_every=25, schedule="constant")


class EvalConfig(Section):
    n: int = 200
    pass_k: list[int] = [1, 4]
    samples: int = 4  # sampled answers per problem for pass@k
    temperature: float = 1.0


class Config(Section):
    seed: int = 1337
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    probes: ProbesConfig = ProbesConfig()
    sft: SFTConfig = SFTConfig()
    rl: RLConfig = RLConfig()
    eval: EvalConfig = EvalConfig()
    envs: dict[str, dict[str, Any]] = {}  # per-environment options, e.g. [envs.arithmetic] max_digits = 3
    system: SystemConfig = SystemConfig()

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.model_dump()))

    def section_hash(self, *names: str) -> str:
        import hashlib
        import json

        dump = self.model_dump()
        return hashlib.sha256(json.dumps({n: dump[n] for n in names}, sort_keys=True).encode()).hexdigest()[:16]


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null; a missing key means the default None."""
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_value(text: str) -> Any:
    """`--set` values are TOML literals (3e-3, true, "x", [1, 2]); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise GlasslabError(f"--set '{pair}' is not KEY=VALUE: write it like --set train.lr=3e-3")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _parse_value(value.strip())
    return out


def load_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise GlasslabError(f"config file '{path}' not found: pass an existing TOML file")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise GlasslabError(f"config file '{path}' is not valid TOML ({e}): fix the syntax") from None


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        near = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise GlasslabError(f"unknown preset '{name}': {hint}choose one of {', '.join(PRESETS)}")
    return tomllib.loads(resources.files("glasslab.presets").joinpath(f"{name}.toml").read_text())


def _explain(err: ValidationError, model: type[BaseModel]) -> str:
    e = err.errors()[0]
    loc = [str(p) for p in e["loc"]]
    key = ".".join(loc)
    if e["type"] == "extra_forbidden":
        node: Any = model
        for part in loc[:-1]:
            node = node.model_fields[part].annotation
        valid = list(node.model_fields)
        near = difflib.get_close_matches(loc[-1], valid, n=1)
        fix = f"did you mean '{'.'.join(loc[:-1] + [near[0]])}'?" if near else f"valid keys here: {', '.join(valid)}"
        return f"unknown config key '{key}': {fix}"
    got = e.get("input")
    return f"bad value for config key '{key}' ({got!r}): {e['msg']}"


def build_config(data: dict[str, Any]) -> Config:
    """Validate over the full default tree, so overriding one key of a nested section keeps that
    section's own defaults (sft.train's lr is not the pretraining lr)."""
    try:
        return Config.model_validate(_merge(Config().model_dump(), data))
    except ValidationError as err:
        raise GlasslabError(_explain(err, Config)) from None


def resolve(
    preset: str | None = "tiny",
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Layer the sources in order; the result is validated once, as a whole."""
    data: dict[str, Any] = base or {}
    if preset:
        data = _merge(data, preset_dict(preset))
    if config_file:
        data = _merge(data, load_toml(config_file))
    data = _merge(data, parse_overrides(overrides or []))
    return build_config(data)
