"""One resolved Config per run: defaults <- preset TOML <- user TOML <- `--set a.b=value`.

Every section is a strict pydantic model, so a typo is an error that names the nearest valid key
instead of a silently ignored setting.
"""

from __future__ import annotations

import copy
import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w
import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), and n_head by n_kv_head ({kv})"
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
    # torch.compile the training forward. auto: when the stage's batches have one shape (pretraining) and, on CPU,
    # it has enough steps to win the compilation back (glasslab.train.compiling).
    compile: bool | Literal["auto"] = "auto"
    threads: int | None = None  # None: torch's default
    # Training matmuls under bfloat16 autocast (weights, optimizer state and evaluation stay float32).
    # auto: on where the hardware has fast bf16 (CUDA with bf16, a CPU with AVX512-BF16 or AMX), else off.
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # --profile N: torch.profiler over N steps of each stage after a short warm-up; writes profile/<stage>/ (0: off)
    profile: int = Field(0, ge=0)


class ProbesConfig(Section):
    """Which probes run and how often, in steps (0 turns a cadenced probe off). `mode = "full"` runs every
    probe at every step; `"off"` adds no hooks at all. Defaults are cheap enough to leave on (bench/probe_overhead.py)."""

    mode: Literal["off", "default", "full"] = "default"
    grads_every: int = Field(10, ge=0)  # per-tensor/per-block grad, weight and update norms, update ratio, Adam moments
    attention_every: int = Field(50, ge=0)  # entropy, max logit and <|bos|> mass per head, on the fixed probe rows
    activations_every: int = Field(50, ge=0)  # per-block output RMS / max / kurtosis and output-logit stats, same rows
    loss_by_position: bool = True  # validation loss per log-spaced position bucket with 95% intervals, at the last step
    position_every: int = Field(0, ge=0)  # steps between loss-by-position evaluations before the last step (0: none)
    position_windows: int = Field(512, ge=1)  # pretraining windows it reads (SFT: its validation set), so the
    # intervals are narrower than the differences between buckets
    spikes: bool = True  # spike detector + dossiers, and naming the first non-finite module on divergence
    spike_window: int = Field(50, ge=8)  # steps in the rolling median/MAD band
    spike_threshold: float = Field(6.0, gt=0)  # robust z-score (MAD scaled to a σ) that counts as a spike
    # The loss band's σ is at least this (nats): near zero loss, one wrong token in a batch is not a spike.
    spike_loss_floor: float = Field(0.01, ge=0)
    spike_history: int = Field(8, ge=0)  # preceding steps kept in a dossier
    spike_topk: int = Field(8, ge=1)  # batch rows and token positions listed in a dossier


class SFTConfig(Section):
    """Supervised fine-tuning on chat conversations: made by task environments, or read from a JSONL file."""

    tasks: list[str] = ["arithmetic"]  # environments (options in [envs.<name>]); [] to train on `data` only
    weights: dict[str, float] = {}  # share of the examples per listed task (default 1), e.g. {arithmetic = 3}
    data: str | None = None  # a conversations JSONL instead of (or besides) the tasks
    examples: int = Field(20000, ge=1)  # training conversations drawn from the tasks (a data file adds all its own)
    val_examples: int = Field(256, ge=0)  # held-out conversations (eval split of the tasks) for val/loss
    val_fraction: float = Field(0.05, ge=0, lt=1)  # share of the data file's conversations held out for val/loss
    eval_n: int = Field(100, ge=0)  # held-out problems per task for eval/<task>/accuracy at each evaluation
    max_new_tokens: int = Field(32, ge=1)  # generation budget of those evaluations and of the samples
    # Share of the training examples that are pretraining text (windows of block_size / 2 tokens from the corpus's
    # train split, every token trained), so SFT does not wipe out the language model; 0: none.
    replay: float = Field(0.0, ge=0, lt=1)
    # defaults: the tiny recipe (the default model is the tiny one)
    train: TrainConfig = TrainConfig(
        steps=2000, batch_size=64, optimizer="muon", lr=6e-3, warmup_steps=50, eval_every=500, checkpoint_every=500
    )

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if not self.tasks and not self.data:
            raise ValueError("give sft.tasks or sft.data (or both): there is nothing to train on")
        if any(w < 0 for w in self.weights.values()) or (
            self.tasks and not sum(self.weights.get(t, 1.0) for t in self.tasks)
        ):
            raise ValueError("task weights must be >= 0, and not all zero for the tasks in sft.tasks")
        return self


class RLConfig(Section):
    """Reinforcement learning from an environment's rewards: GRPO, or DPO on pairs built from it.
    Each step samples group_size completions for each of prompts_per_step training problems."""

    algo: Literal["grpo", "dpo"] = "grpo"
    # The task environment, or several with their shares of the problems: { countdown = 3, arithmetic = 1 }.
    env: str | dict[str, float] = "arithmetic"
    # Per environment, its options for RL (training and the stage's evaluations), layered over [envs.<name>]:
    # RL can work on another difficulty than SFT, e.g. [rl.env_options.arithmetic] min_digits = 2.
    env_options: dict[str, dict[str, Any]] = {}
    group_size: int = Field(8, ge=2)
    prompts_per_step: int = Field(8, ge=1)
    max_new_tokens: int = Field(24, ge=1)
    temperature: float = Field(1.0, gt=0)  # sampling temperature; the policy trained is softmax(logits / temperature)
    # KL coefficient; 0 drops the penalty (rl/kl_ref is still measured). Against this loss's std-scaled advantages,
    # GRPO on countdown: mean KL to the reference 1.29 with none, 0.70 at DeepSeekMath's 0.04, 0.39 at 0.1, at equal
    # held-out accuracy (kl-ablation, README).
    beta: float = Field(0.1, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    eps_low: float = Field(0.2, ge=0)  # clip ratio to [1 - eps_low, 1 + eps_high]
    eps_high: float = Field(0.28, ge=0)
    num_iterations: int = Field(1, ge=1)  # optimizer steps per rollout batch (>1: ratios and clipping matter)
    # Sample the next rollout batch in a background process, by a copy of the policy, while this one trains: 1.2-1.7x
    # the steps per second in the main job's RL on 2 CPU cores, by machine (about 2x in bench/trl_grpo.py's step), at
    # the price of training on samples from one optimizer step ago (π_old is the sampling policy; the clipped ratio
    # corrects for it; README: "Generating ahead, measured"). rl/ahead.py.
    generate_ahead: bool = False
    scale_rewards: Literal["group", "batch", "none"] = "group"  # divide advantages by this std (none: Dr. GRPO)
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = "dapo"
    mask_truncated: bool = True  # completions cut at max_new_tokens get no gradient
    drop_zero_std: bool = True  # train only on groups whose rewards vary
    entropy_coef: float = 0.0  # > 0: entropy bonus
    reward_weights: dict[str, float] = {"correct": 1.0, "format": 0.1}  # the reward is this weighted sum
    ref_reset_every: int = Field(0, ge=0)  # 0: the reference stays the SFT model
    dpo_beta: float = Field(0.1, gt=0)
    eval_n: int = Field(200, ge=1)  # held-out problems for eval/<env>/accuracy and pass@k
    # Each environment that env_options changes is also evaluated (greedy) with its [envs.<name>] options alone, as
    # eval/<env>@sft/...: what RL on harder problems makes the model forget of the ones SFT trained on.
    retention_eval: bool = True
    table_every: int = Field(25, ge=0)  # rollouts/step-N.jsonl every this many steps (0: never)
    detect_window: int = Field(10, ge=2)  # steps per window of the reward-hacking detectors
    train: TrainConfig = TrainConfig(
        steps=150,
        batch_size=1,
        lr=5e-5,
        warmup_steps=5,
        weight_decay=0.0,
        eval_every=50,
        checkpoint_every=25,
        schedule="constant",
    )

    @model_validator(mode="after")
    def _mix(self) -> RLConfig:
        if isinstance(self.env, dict) and (not self.env or min(self.env.values()) < 0 or not sum(self.env.values())):
            raise ValueError("a mix of environments needs at least one, with weights >= 0, not all zero")
        return self


class EvalConfig(Section):
    n: int = Field(200, ge=1)
    pass_k: list[int] = [1, 4]
    samples: int = Field(4, ge=0)  # sampled answers per problem for pass@k (0: greedy only)
    temperature: float = Field(1.0, ge=0)
    max_new_tokens: int = Field(32, ge=1)  # per answer, tool results included


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


def _merge(base: dict[str, Any], over: dict[str, Any], model: type[BaseModel] | None = None) -> dict[str, Any]:
    """Layer `over` on `base` along the schema of `model` (default: the whole Config). Sections merge key by
    key, and so do the option tables of `[envs.<name>]` and `[rl.env_options.<name>]`; every other value, weight
    tables included, is replaced whole: a layer's `reward_weights = { correct = 1 }` means exactly that."""
    model = model or Config
    out = dict(base)
    for k, v in over.items():
        field = model.model_fields.get(k)
        kind = field.annotation if field else None
        if not (isinstance(v, dict) and isinstance(out.get(k), dict)):
            out[k] = v
        elif isinstance(kind, type) and issubclass(kind, BaseModel):
            out[k] = _merge(out[k], v, kind)
        elif get_origin(kind) is dict and get_origin(get_args(kind)[1]) is dict:  # option tables by name
            out[k] = {**out[k], **{n: {**out[k].get(n, {}), **t} for n, t in v.items()}}
        else:
            out[k] = v
    return out


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """`--set a.b.c=v`: the value at that one key becomes v (a table given whole replaces the table)."""
    *parents, leaf = key.split(".")
    for p in parents:
        if not isinstance(data.get(p), dict):
            data[p] = {}
        data = data[p]
    data[leaf] = value


def _parse_value(text: str) -> Any:
    """`--set` values are TOML literals (3e-3, true, "x", [1, 2]); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`--set KEY=VALUE` pairs as (dotted key, parsed value), in order."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise GlasslabError(f"--set '{pair}' is not KEY=VALUE: write it like --set train.lr=3e-3")
        out.append((key.strip(), _parse_value(value.strip())))
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
    return _validate(_merge(Config().model_dump(), data))


def _validate(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise GlasslabError(_explain(err, Config)) from None


def resolve(
    preset: str | None = "tiny",
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Layer the sources in order over the defaults; the result is validated once, as a whole."""
    data = _merge(Config().model_dump(), base or {})
    if preset:
        data = _merge(data, preset_dict(preset))
    if config_file:
        data = _merge(data, load_toml(config_file))
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides or []):
        _set(data, key, value)
    return _validate(data)  # already layered over the defaults
