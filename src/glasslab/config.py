"""One resolved Config per run: defaults <- preset TOML <- user TOML <- `--set a.b=value`.

Every section is a strict pydantic model, so a typo is an error that names the nearest valid key
instead of a silently ignored setting.
"""

from __future__ import annotations

import copy
import difflib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import tomli_w
import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from glasslab.budget import parse_budget
from glasslab.errors import GlasslabError

PRESETS = ("smoke", "tiny", "tiny-moe", "small", "gpt2-124m", "small-moe")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RopeScaling(Section):
    """Llama 3's RoPE frequency scaling: wavelengths longer than original_context / low_freq_factor are stretched
    by `factor`, shorter than original_context / high_freq_factor kept, the ones between interpolated."""

    kind: Literal["llama3"] = "llama3"
    factor: float = Field(gt=0)
    low_freq_factor: float = Field(gt=0)
    high_freq_factor: float = Field(gt=0)
    original_context: int = Field(ge=1)


class MoEConfig(Section):
    """`[model.moe]`: a mixture-of-experts MLP in place of the dense one (model/moe.py). n_experts = 0: dense.
    Balancing methods combine freely: aux_loss > 0 (Switch), bias_rate > 0 (DeepSeek-V3's auxiliary-loss-free
    bias), z_loss > 0 (router z-loss); all zero is no balancing."""

    n_experts: int = Field(0, ge=0)
    top_k: int = Field(1, ge=1)
    # Hidden width of each routed expert; None: the dense MLP's width / (top_k + shared), so the active
    # parameters per token match the dense model's (fine-grained experts: more experts, narrower).
    hidden: int | None = Field(None, ge=1)
    shared: int = Field(0, ge=0)  # shared experts (of width `hidden`) every token goes through
    score: Literal["softmax", "sigmoid"] = "softmax"  # sigmoid: DeepSeek-V3's independent per-expert scores
    # Divide the top-k gates by their sum when top_k > 1 (at top_k = 1 the gate would be 1 and the router untrained).
    renormalize: bool = True
    layers: list[int] | None = None  # the blocks that get an MoE MLP (others stay dense); None: every block
    capacity_factor: float | None = Field(None, gt=0)  # None: dropless; else assignments over capacity are dropped
    aux_loss: float = Field(0.0, ge=0)  # coefficient of the Switch auxiliary load-balancing loss, summed over layers
    bias_rate: float = Field(0.0, ge=0)  # γ of the bias update after each optimizer step; 0: no bias balancing
    z_loss: float = Field(0.0, ge=0)  # coefficient of the router z-loss, summed over layers

    @model_validator(mode="after")
    def _fits(self) -> MoEConfig:
        if self.n_experts and self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed n_experts ({self.n_experts})")
        return self


class Mismatch(ValueError):
    """A cross-field config error. `text` names each field as {field}; the message shows it as `section.field
    (value)`, so the user sees which keys to change rather than the whole section."""

    def __init__(self, text: str, section: BaseModel, *fields: str) -> None:
        super().__init__(text.format(**{f: f"{f} ({getattr(section, f)!r})" for f in fields}))
        self.text, self.values = text, {f: getattr(section, f) for f in fields}

    def qualified(self, prefix: str) -> str:
        return self.text.format(**{f: f"{prefix}{f} ({v!r})" for f, v in self.values.items()})


class ModelConfig(Section):
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: int | None = Field(None, ge=1)  # None: same as n_head; fewer heads = grouped-query attention
    n_embd: int = Field(128, ge=2)
    block_size: int = Field(128, ge=2)
    mlp: Literal["gelu", "swiglu", "relu2"] = "relu2"
    mlp_ratio: float = Field(4.0, gt=0)
    qk_norm: bool = True
    tie_embeddings: bool = True
    logit_softcap: float | None = Field(None, gt=0)
    rope_theta: float = Field(10000.0, gt=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    vocab_size: int | None = Field(None, ge=1)  # filled from the tokenizer
    # Options an imported model may need (import-hf); the defaults are glasslab's own architecture.
    head_dim: int | None = Field(None, ge=2)  # None: n_embd // n_head
    mlp_hidden: int | None = Field(None, ge=1)  # the MLP's hidden width; None: from mlp_ratio
    attn_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    norm_eps: float | None = Field(None, gt=0)  # RMSNorm epsilon; None: torch's default (the dtype's machine epsilon)
    rope_scaling: RopeScaling | None = None
    moe: MoEConfig = MoEConfig()

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.head_dim is None and self.n_embd % self.n_head:
            raise Mismatch("{n_embd} must be divisible by {n_head}: change one of them", self, "n_embd", "n_head")
        if self.n_head % (self.n_kv_head or self.n_head):
            raise Mismatch("{n_head} must be divisible by {n_kv_head}: change one of them", self, "n_head", "n_kv_head")
        if self.head_dim is not None and self.head_dim % 2:
            raise Mismatch("{head_dim} must be even for rotary embeddings", self, "head_dim")
        if self.head_dim is None and (self.n_embd // self.n_head) % 2:
            raise Mismatch(
                "{n_embd} / {n_head} (the head width) must be even for rotary embeddings: change one of them",
                self,
                "n_embd",
                "n_head",
            )
        outside = [i for i in self.moe.layers or [] if not 0 <= i < self.n_layer]
        if outside:
            raise ValueError(
                f"moe.layers {outside} are not blocks of a {self.n_layer}-layer model: use 0..{self.n_layer - 1}"
            )
        return self


class TokenizerConfig(Section):
    kind: Literal["bpe", "char", "hf"] = "bpe"  # hf: an imported model's tokenizer.json, kept as it is
    # bpe: at least 256 bytes + the special tokens (checked when trained); hf: the model's embedding rows
    vocab_size: int = Field(2048, ge=1)
    # hf only, read from the model's tokenizer_config.json at import: its chat template (Jinja) and the tokens
    # that start a document, end a turn (where generation stops) and pad batches
    chat_template: str | None = None
    bos_token: str | None = None
    end_token: str | None = None
    pad_token: str | None = None
    template_vars: dict[str, str] = {}  # the other special tokens the template reads (eos_token, ...)

    @model_validator(mode="after")
    def _hf_complete(self) -> TokenizerConfig:
        if self.kind == "hf" and not (self.chat_template and self.bos_token and self.end_token and self.pad_token):
            raise ValueError("tokenizer.kind = 'hf' needs chat_template, bos_token, end_token and pad_token")
        return self


class MixtureStep(Section):
    """From a pretraining step on (a count of steps done), new domain weights. Give `step`, or `at`: a fraction of
    train.steps, which stays at the same point of the run when a study's --scale changes the steps."""

    step: int | None = Field(None, ge=0)
    at: float | None = Field(None, ge=0, lt=1)
    weights: dict[str, float]

    @model_validator(mode="after")
    def _one_of(self) -> MixtureStep:
        if (self.step is None) == (self.at is None):
            raise ValueError(
                "a mixture schedule entry needs exactly one of step (a step) or at (a fraction of the run)"
            )
        return self

    def start(self, total_steps: int) -> int:
        return self.step if self.step is not None else round(self.at * total_steps)


class MixtureConfig(Section):
    """`[data.mixture]`: pretraining data from named domains (data/mixture.py), each row of a batch drawn from one
    domain with probability given by the weights in force at that step; validation loss is also reported per
    domain. Empty `sources`: no mixture, `data.source` alone."""

    # domain -> source: "shakespeare", a path as for data.source, or a generated one: "synthetic:arithmetic"
    sources: dict[str, str] = {}
    weights: dict[str, float] = {}  # share of rows per domain at the start (a domain left out: 1)
    schedule: list[MixtureStep] = []  # later weights, e.g. [{ step = 300, weights = { arithmetic = 1 } }]

    @model_validator(mode="after")
    def _domains(self) -> MixtureConfig:
        for where, weights in [
            ("weights", self.weights),
            *((f"schedule entry {i}", s.weights) for i, s in enumerate(self.schedule)),
        ]:
            unknown = sorted(set(weights) - set(self.sources))
            if unknown:
                raise ValueError(f"{where} names domains {unknown} that are not in sources {sorted(self.sources)}")
            full = {d: weights.get(d, 1.0 if where == "weights" else 0.0) for d in self.sources}
            if min(full.values(), default=0) < 0 or (self.sources and not sum(full.values())):
                raise ValueError(f"{where}: weights must be >= 0 and not all zero")
        for kind in ("step", "at"):
            starts = [getattr(s, kind) for s in self.schedule if getattr(s, kind) is not None]
            if starts != sorted(set(starts)):
                raise ValueError(f"schedule entries' {kind} values {starts} must be increasing")
        return self


class DataConfig(Section):
    source: str | None = None  # None: the embedded Shakespeare corpus
    text_field: str = "text"
    val_fraction: float = Field(0.05, gt=0, lt=1)
    # keep only the first documents up to this many characters (quick experiments)
    max_chars: int | None = Field(None, ge=1)
    mixture: MixtureConfig = MixtureConfig()


class TrainConfig(Section):
    """One stage's optimisation: steps, batch, optimiser, schedule, and how often to evaluate and save."""

    steps: int = Field(1000, ge=1)
    # Stop earlier, after the step that crosses this: "2000steps", "1e6tokens", "90s" (budget.py). The
    # schedule stays over `steps`; seconds depend on the machine's load and are not reproducible.
    budget: str | None = None
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = Field(3e-3, gt=0)
    muon_lr: float = Field(0.02, gt=0)  # for the hidden matrices when optimizer = "muon"; AdamW (lr) does the rest
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, ge=0)  # None or 0: no clipping
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.2, ge=0, le=1)  # wsd: the share of steps spent decaying at the end
    z_loss: float = Field(0.0, ge=0)
    eval_every: int = Field(100, ge=0)  # 0: only at the end of the stage
    eval_batches: int = Field(8, ge=1)
    sample_every: int = Field(0, ge=0)  # 0: only at the end of the stage
    checkpoint_every: int = Field(200, ge=1)
    keep_last: int = Field(2, ge=1)

    @field_validator("budget")
    @classmethod
    def _budget_parses(cls, v: str | None) -> str | None:
        return None if v is None else str(parse_budget(v))


class SystemConfig(Section):
    device: str = "auto"  # auto: cuda when available, else cpu
    # torch.compile the training forward. auto: when the stage's batches have one shape (pretraining) and, on CPU,
    # it has enough steps to win the compilation back (glasslab.train.compiling).
    compile: bool | Literal["auto"] = "auto"
    threads: int | None = Field(None, ge=1)  # None: torch's default
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
    spike_window: int = Field(50, ge=8)  # steps in the rolling band (median or trend line, and MAD)
    # Robust z-score (MAD scaled to a σ) above which the loss counts as a spike, and the same for the gradient
    # norm. High enough that the tails of healthy runs (SFT's rare hard batches) stay below them, low enough for
    # the injected faults of bench/spike_detection.py; the gradient norm's tail is the heavier of the two.
    spike_threshold: float = Field(7.0, gt=0)
    spike_grad_threshold: float = Field(8.0, gt=0)  # (of its log, with spike_log_grad)
    spike_log_grad: bool = True  # score the log of the gradient norm: it varies by factors, not by amounts
    spike_grad_floor: float = Field(0.01, ge=0)  # with spike_log_grad: the log band's σ is at least this
    # Compare a step with the trend line of its window rather than its median: a falling loss is not flat, and a
    # median lags it while the trend widens the MAD.
    spike_detrend: bool = True
    spike_skip_warmup: bool = True  # neither score nor keep the steps of learning-rate warm-up (the norm moves then)
    spike_quiet: int = Field(5, ge=1)  # steps in a row below threshold that end an episode (one event per episode)
    # The loss band's σ is at least this (nats): near zero loss, one wrong token in a batch is not a spike.
    spike_loss_floor: float = Field(0.01, ge=0)
    spike_history: int = Field(8, ge=0)  # preceding steps kept in a dossier
    spike_topk: int = Field(8, ge=1)  # batch rows and token positions listed in a dossier
    # MoE models only (probes/router.py): load, MaxVio, entropy, gates and biases per layer from the training batch
    router_every: int = Field(1, ge=0)
    router_churn_every: int = Field(25, ge=0)  # first-choice churn on the fixed probe rows (one small forward)
    router_dead_window: int = Field(100, ge=1)  # probed steps without an assignment that make an expert dead


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
            raise Mismatch(
                "{tasks} and {data} are both empty: give one or both, to have something to train on",
                self,
                "tasks",
                "data",
            )
        if any(w < 0 for w in self.weights.values()) or (
            self.tasks and not sum(self.weights.get(t, 1.0) for t in self.tasks)
        ):
            raise Mismatch(
                "{weights} must be >= 0 and not all zero for the tasks in {tasks}: fix the weights",
                self,
                "weights",
                "tasks",
            )
        return self


class GRPOConfig(Section):
    """GRPO's own settings (rl.algo = "grpo"): the clipped surrogate, its KL penalty, the advantages and which
    completions and groups it trains on."""

    # KL coefficient; 0 drops the penalty (rl/kl_ref is still measured). How strongly each value holds the policy
    # near the reference, and what that does to held-out accuracy: the kl-ablation study (docs/RESULTS.md).
    beta: float = Field(0.1, ge=0)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    eps_low: float = Field(0.2, ge=0)  # clip ratio to [1 - eps_low, 1 + eps_high]
    eps_high: float = Field(0.28, ge=0)
    num_iterations: int = Field(1, ge=1)  # optimizer steps per rollout batch (>1: ratios and clipping matter)
    scale_rewards: Literal["group", "batch", "none"] = "group"  # divide advantages by this std (none: Dr. GRPO)
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = "dapo"
    mask_truncated: bool = True  # completions cut at max_new_tokens get no gradient
    drop_zero_std: bool = True  # train only on groups whose rewards vary
    entropy_coef: float = Field(0.0, ge=0)  # > 0: entropy bonus


class DPOConfig(Section):
    """DPO's own settings (rl.algo = "dpo")."""

    beta: float = Field(0.1, gt=0)  # how sharply the loss separates chosen from rejected, relative to the reference


class RLConfig(Section):
    """Reinforcement learning from an environment's rewards: GRPO, or DPO on pairs built from it.
    Each step samples group_size completions for each of prompts_per_step training problems. What only one
    algorithm uses lives in its own section, [rl.grpo] or [rl.dpo]: setting the other one's is an error."""

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
    # Sample the next rollout batch in a background process, by a copy of the policy, while this one trains: the
    # step overlaps sampling with training, at the price of training on samples from one optimizer step ago
    # (π_old is the sampling policy; GRPO's clipped ratio corrects for it). rl/ahead.py; the figures in
    # docs/BENCHMARKS.md and docs/RESULTS.md.
    generate_ahead: bool = False
    reward_weights: dict[str, float] = {"correct": 1.0, "format": 0.1}  # the reward is this weighted sum
    ref_reset_every: int = Field(0, ge=0)  # 0: the reference stays the SFT model
    eval_n: int = Field(200, ge=1)  # held-out problems for eval/<env>/accuracy and pass@k
    # Each environment that env_options changes is also evaluated (greedy) with its [envs.<name>] options alone, as
    # eval/<env>@sft/...: what RL on harder problems makes the model forget of the ones SFT trained on.
    retention_eval: bool = True
    table_every: int = Field(25, ge=0)  # rollouts/step-N.jsonl every this many steps (0: never)
    detect_window: int = Field(10, ge=2)  # steps per window of the reward-hacking detectors
    grpo: GRPOConfig = GRPOConfig()
    dpo: DPOConfig = DPOConfig()
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
            raise Mismatch(
                "{env}: a mix of environments needs at least one, with weights >= 0, not all zero: fix the weights",
                self,
                "env",
            )
        return self


class EvalConfig(Section):
    n: int = Field(200, ge=1)
    pass_k: list[Annotated[int, Field(ge=1)]] = [1, 4]
    samples: int = Field(4, ge=0)  # sampled answers per problem for pass@k (0: greedy only)
    temperature: float = Field(1.0, ge=0)
    max_new_tokens: int = Field(32, ge=1)  # per answer, tool results included


class Config(Section):
    seed: int = Field(1337, ge=0, lt=2**32)  # numpy's seeds are unsigned 32-bit
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
        """Every setting the run uses: the section of the RL algorithm not chosen is left out, so the file can be
        given back as `--config` (where setting it is an error) and reloads with that section's defaults."""
        tree = self.model_dump()
        del tree["rl"][_other_algo(self.rl.algo)]
        return tomli_w.dumps(_drop_none(tree))


def _other_algo(algo: str) -> str:
    """The RL algorithm whose own section ([rl.grpo] or [rl.dpo]) does not apply under rl.algo = `algo`."""
    return {"grpo": "dpo", "dpo": "grpo"}[algo]


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null; a missing key means the default None (in tables inside lists too: a mixture schedule)."""
    return {k: _without_none(v) for k, v in d.items() if v is not None}


def _without_none(v: Any) -> Any:
    if isinstance(v, dict):
        return _drop_none(v)
    return [_without_none(x) for x in v] if isinstance(v, list) else v


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
        # a key that moved into a section one level down (rl.beta is rl.grpo.beta, rl.dpo_beta is rl.dpo.beta),
        # else the nearest spelling
        leaf, (head, _, tail) = loc[-1], loc[-1].partition("_")
        near = [
            f"{name}.{sub}"
            for name, f in node.model_fields.items()
            for sub in (leaf, tail if head == name else None)
            if sub in _section_keys(f.annotation)
        ]
        near = near or difflib.get_close_matches(leaf, valid, n=1)
        paths = " or ".join(f"'{'.'.join(loc[:-1] + [n])}'" for n in near)
        fix = f"did you mean {paths}?" if near else f"valid keys here: {', '.join(valid)}"
        return f"unknown config key '{key}': {fix}"
    cause = e.get("ctx", {}).get("error")
    if isinstance(cause, Mismatch):
        return cause.qualified(key + "." if key else "")
    if isinstance(e.get("input"), dict) and e["type"] == "value_error":  # another cross-field check: no dict dump
        return f"bad config section '{key}': {e['msg'].removeprefix('Value error, ')}"
    msg = e["msg"][:1].lower() + e["msg"][1:]
    return f"bad value for config key '{key}' ({e.get('input')!r}): {msg}: fix it, e.g. --set {key}=VALUE"


def _section_keys(annotation: Any) -> list[str]:
    """The keys of a config section's type; none for any other value's."""
    return list(annotation.model_fields) if isinstance(annotation, type) and issubclass(annotation, BaseModel) else []


def build_config(data: dict[str, Any]) -> Config:
    """Validate over the full default tree, so overriding one key of a nested section keeps that
    section's own defaults (sft.train's lr is not the pretraining lr). A run's saved config.toml from before
    [rl.grpo] and [rl.dpo] existed loads with its flat RL keys moved into them."""
    return _validate(_merge(Config().model_dump(), _sectioned_rl(data)))


def _sectioned_rl(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with a saved config's flat GRPO keys (rl.beta, ...) under rl.grpo and rl.dpo_beta as rl.dpo.beta."""
    rl = data.get("rl")
    flat = set(GRPOConfig.model_fields) | {"dpo_beta"}
    if not isinstance(rl, dict) or not flat & set(rl):
        return data
    rl = dict(rl)
    grpo = {k: rl.pop(k) for k in list(rl) if k in GRPOConfig.model_fields}
    dpo = {"beta": rl.pop("dpo_beta")} if "dpo_beta" in rl else {}
    rl["grpo"], rl["dpo"] = rl.get("grpo", {}) | grpo, rl.get("dpo", {}) | dpo
    return data | {"rl": rl}


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
    user = set()  # the dotted keys the user set, checked against the chosen algorithm once it is known
    if config_file:
        layer = load_toml(config_file)
        user |= _dotted_keys(layer)
        data = _merge(data, layer)
    data = copy.deepcopy(data)
    for key, value in parse_overrides(overrides or []):
        _set(data, key, value)
        user |= _dotted_keys({key: value})
    cfg = _validate(data)  # already layered over the defaults
    _check_algo_keys(cfg, user)
    return cfg


def _dotted_keys(tree: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted key of every value in a nested table that is not itself a table (rl.grpo.beta)."""
    out = set()
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out |= _dotted_keys(v, f"{key}.") if isinstance(v, dict) else {key}
    return out


def _check_algo_keys(cfg: Config, user: set[str]) -> None:
    """A setting of the algorithm not chosen would be silently ignored: if the user set one, say so. Only the
    user's keys count (--config, --set): a preset may tune GRPO and still be run with rl.algo = "dpo"."""
    other = _other_algo(cfg.rl.algo)
    stray = sorted(k for k in user if k.startswith(f"rl.{other}."))
    if stray:
        one = len(stray) == 1
        raise GlasslabError(
            f'{", ".join(stray)} {"does" if one else "do"} not apply with rl.algo = "{cfg.rl.algo}": '
            f'remove {"it" if one else "them"}, or set rl.algo = "{other}"'
        )
