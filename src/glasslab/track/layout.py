"""The run directory's contract, in one place: every path in it, the manifest's keys, the run statuses, the stage
names and the metric families. Writers build names and readers parse them through this module only.

It imports nothing beyond the standard library, so every reader (report, compare, plot, `runs`, studies) works
in a process without torch. The layout of a run directory `runs/<name>/`:

    config.toml                         the resolved config
    manifest.json                       versions, seed, device, status, progress (keys: `Manifest`)
    tokenizer.json                      the run's tokenizer
    metrics.db                          live metrics (SQLite WAL); metrics.parquet once compacted
    samples.jsonl                       generated samples
    events.jsonl                        warnings and notices
    checkpoints/<stage>/step-0000123/   one checkpoint (files: CHECKPOINT_FILES, then COMPLETE)
    checkpoints/rl/reference-step-0000040.safetensors   a reset RL reference policy
    spikes/step-0000120.json            a spike dossier
    rollouts/step-20.jsonl              an RL step's completions with their scores
    eval/<task>-seed<S>.jsonl           `glasslab eval`'s answers, one line per problem
    eval/final.json                     the main job's held-out evaluation: stage -> task -> summary
    profile/<stage>/trace.json          `--profile N`: a Chrome trace of N steps (chrome://tracing, Perfetto)
    profile/<stage>/summary.json        the same steps' time by part of a step, and the costliest ops
    report.html                         the run report

Token shards live beside the runs, in `<runs dir>/.cache/`, shared by every run on the same data and tokenizer;
`glasslab compare` writes compare.html there by default. A study directory holds plan.json, runs/ (run
directories), logs/<run>.log, report.html, summary.json, findings.md and figures/<name>.png.

An experiments directory (`glasslab experiment`, default `experiments/`) is a study directory shared by every
experiment: runs/<arm>-seed<S>/ are named by a hash of what makes them (config, stages, code), so a baseline run
already made is found and reused, never trained twice; ledger.jsonl holds one JSON object per experiment, appended
atomically; ledger.html is the page over it; trees/<hash>/ are patched copies of the source tree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypedDict, get_args

# Files and directories at the top of a run directory.
CONFIG = "config.toml"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
METRICS_DB = "metrics.db"
METRICS_PARQUET = "metrics.parquet"
SAMPLES = "samples.jsonl"
EVENTS = "events.jsonl"
REPORT = "report.html"
CHECKPOINTS = "checkpoints"
SPIKES = "spikes"
ROLLOUTS = "rollouts"
EVAL_DIR = "eval"
FINAL_EVAL = "final.json"  # inside eval/
PROFILE_DIR = "profile"
PROFILE_TRACE = "trace.json"  # inside profile/<stage>/
PROFILE_SUMMARY = "summary.json"  # inside profile/<stage>/
TOKEN_CACHE = ".cache"  # beside the run directories, not inside one
COMPARE = "compare.html"  # `glasslab compare`'s default page, beside the first run compared

# A study directory (glasslab.study): its plan, its runs and what is computed from them.
STUDY_PLAN = "plan.json"
STUDY_RUNS = "runs"
STUDY_LOGS = "logs"  # <run name>.log: each run's output
STUDY_REPORT = REPORT
STUDY_SUMMARY = "summary.json"
STUDY_FINDINGS = "findings.md"
STUDY_FIGURES = "figures"  # <figure name>.png

# An experiments directory (glasslab.experiment): a study directory (plan.json, runs/, logs/) plus these.
EXPERIMENTS = "experiments"  # the default, relative to the working directory
LEDGER = "ledger.jsonl"
LEDGER_PAGE = "ledger.html"
EXPERIMENT_TREES = "trees"  # <patch hash>/: an isolated, patched copy of the source tree
EXPERIMENT_LOCK = ".lock"  # held while an experiment runs: experiments sharing runs/ take turns

# Inside one checkpoint directory, checkpoints/<stage>/step-NNNNNNN/.
CHECKPOINT_MODEL = "model.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.safetensors"
CHECKPOINT_OPTIMIZER_STATE = "optimizer.json"
CHECKPOINT_RNG = "rng.safetensors"
CHECKPOINT_STATE = "state.json"
CHECKPOINT_EXTRA = (
    "extra.safetensors"  # tensors of the extra state (hooks', objective's); absent from older checkpoints
)
CHECKPOINT_FILES = (
    CHECKPOINT_MODEL,
    CHECKPOINT_OPTIMIZER,
    CHECKPOINT_OPTIMIZER_STATE,
    CHECKPOINT_RNG,
    CHECKPOINT_STATE,
)
CHECKPOINT_COMPLETE = "COMPLETE"  # written last: a directory without it is an interrupted save
TMP_PREFIX = ".tmp-"  # a checkpoint being written, renamed into place when complete

# Stages: the training stages in pipeline order, and the stage the main job's final evaluation and
# `glasslab eval` log their metrics under.
PipelineStage = Literal["pretrain", "sft", "rl"]
PIPELINE: tuple[PipelineStage, ...] = get_args(PipelineStage)
PRETRAIN, SFT, RL = PIPELINE
EVAL = "eval"
STAGES = (*PIPELINE, EVAL)  # every stage metrics are logged under

# Run statuses, in the manifest's `status`.
Status = Literal["created", "running", "completed", "failed", "interrupted"]
STATUSES: tuple[Status, ...] = ("created", "running", "completed", "failed", "interrupted")


class Manifest(TypedDict, total=False):
    """manifest.json: what a run is and how far it got. RunDir.create writes the first block; the rest is added
    by the command that starts the run and by the stages as they go."""

    glasslab_version: str  # the package that created the run
    git_commit: str | None  # HEAD of the checkout glasslab ran from (None: installed package)
    torch_version: str | None
    created: str  # ISO 8601 UTC
    updated: str  # ISO 8601 UTC, at every manifest write
    status: Status
    message: str | None  # why the run failed or stopped, and how to continue
    stage: str | None  # the stage running or last run
    stages_done: list[str]  # stages finished, in the order they finished
    last_step: int  # the last optimizer step of `stage`
    device: str | None  # set by each stage
    seed: int | None  # set by each stage
    world_size: int  # processes in pretraining (torchrun)
    command: str  # the command that made the run (`run`, `rl`); `resume` reads it
    pipeline: list[str]  # the stages the run is meant to go through, in order
    preset: str
    init: str | None  # the checkpoint directory the first stage started from
    parent: str | None  # the run that checkpoint belongs to
    make_report: bool  # `glasslab run`: build report.html at the end
    wall_time_s: float  # the main job's wall time, summed over resumed sessions
    peak_rss_mb: float  # the main job's peak resident memory
    report: str  # the path of report.html once built
    source: str  # import-hf: the Hugging Face checkpoint directory the run was imported from


MANIFEST_KEYS = tuple(Manifest.__annotations__)


# Metric families: a metric is named `<family>/<rest>`; the stage it was logged in is a separate column.
TRAIN_FAMILY = "train"  # training loss and its parts
VAL_FAMILY = "val"  # held-out loss, bits per byte, perplexity
OPTIM_FAMILY = "optim"  # learning rate, global gradient norm, clipping
RL_FAMILY = "rl"  # rewards, KL, entropy, clipping, completion lengths (rl/reward/<name>, rl/dpo/...)
EVAL_FAMILY = "eval"  # task evaluation: eval/<task>/accuracy, pass@k, eval/<task>/after_<stage>/...
SPIKE_FAMILY = "spike"  # spike detector scores
TIME_FAMILY = "time"  # seconds per step and per part of a step
THROUGHPUT_FAMILY = "throughput"  # tokens per second, model FLOPs per second, MFU
LOGITS_FAMILY = "logits"  # output-logit max and log-partition
MOE_FAMILY = "moe"  # MoE routing: moe/<kind>/blocks.i[.e<k>] (probes/router.py)
LOSS_BY_POS = "loss_by_pos"  # validation loss per position bucket: loss_by_pos/004-007
LOSS_BY_POS_CI95 = "loss_by_pos_ci95"  # half-width of its 95% interval over windows
# Probe families per parameter or module: <family>/blocks.3.attn.q, <family>/blocks.3, attention also per head.
GRAD_NORM, UPDATE_RATIO, UPDATE_NORM, WEIGHT_NORM = "grad_norm", "update_ratio", "update_norm", "weight_norm"
ADAM_M_NORM, ADAM_V_NORM = "adam_m_norm", "adam_v_norm"
GRADIENT_FAMILIES = (GRAD_NORM, UPDATE_RATIO, UPDATE_NORM, WEIGHT_NORM, ADAM_M_NORM, ADAM_V_NORM)
ATTN_ENTROPY, ATTN_ENTROPY_NORM = "attn_entropy", "attn_entropy_norm"
ATTN_MAX_LOGIT, ATTN_BOS = "attn_max_logit", "attn_bos"  # attn_bos: attention mass on <|bos|> keys (the sink)
ATTENTION_FAMILIES = (ATTN_ENTROPY_NORM, ATTN_ENTROPY, ATTN_MAX_LOGIT, ATTN_BOS)
ACT_RMS, ACT_MAX, ACT_KURTOSIS = "act_rms", "act_max", "act_kurtosis"
ACTIVATION_FAMILIES = (ACT_RMS, ACT_MAX, ACT_KURTOSIS)  # the order of probes.activations.activation_stats
PROBE_FAMILIES = (
    *GRADIENT_FAMILIES,
    *ATTENTION_FAMILIES,
    *ACTIVATION_FAMILIES,
    LOGITS_FAMILY,
    LOSS_BY_POS,
    LOSS_BY_POS_CI95,
)
METRIC_FAMILIES = (
    TRAIN_FAMILY,
    VAL_FAMILY,
    OPTIM_FAMILY,
    RL_FAMILY,
    EVAL_FAMILY,
    SPIKE_FAMILY,
    TIME_FAMILY,
    THROUGHPUT_FAMILY,
    *PROBE_FAMILIES,
)


def metric(family: str, *parts: Any) -> str:
    """`metric("eval", "arithmetic", "accuracy")` -> `eval/arithmetic/accuracy`."""
    return "/".join([family, *map(str, parts)])


def family_of(name: str) -> str:
    """`attn_entropy/blocks.2.h1` -> `attn_entropy`."""
    return name.partition("/")[0]


# Names that carry a step. Checkpoint and reference names pad the step so they sort; the parsers accept any width.
_STEP_DIR = re.compile(r"step-(\d+)")
_REFERENCE = re.compile(r"reference-step-(\d+)\.safetensors")
_STEP_FILE = re.compile(r"step-(\d+)\.(json|jsonl)")
_EVAL_TABLE = re.compile(r"(.+)-seed(\d+)\.jsonl")


def checkpoint_name(step: int) -> str:
    """A checkpoint's directory name: `step-0000123`."""
    return f"step-{step:07d}"


def step_of_checkpoint(path: Path | str) -> int | None:
    """The step in a checkpoint directory's name, None if it is not one (`.tmp-step-...`, a reference file)."""
    m = _STEP_DIR.fullmatch(Path(path).name)
    return int(m[1]) if m else None


def stage_of_checkpoint(path: Path | str) -> str:
    """The stage a checkpoint directory belongs to: checkpoints/<stage>/step-N."""
    return Path(path).parent.name


def reference_name(step: int) -> str:
    """A reset RL reference policy, beside the RL checkpoints: `reference-step-0000040.safetensors`."""
    return f"reference-step-{step:07d}.safetensors"


def step_of_reference(path: Path | str) -> int | None:
    m = _REFERENCE.fullmatch(Path(path).name)
    return int(m[1]) if m else None


def spike_name(step: int) -> str:
    """A spike dossier: `step-0000120.json`."""
    return f"step-{step:07d}.json"


def rollout_name(step: int) -> str:
    """An RL step's rollout table: `step-20.jsonl`."""
    return f"step-{step}.jsonl"


def step_of_file(path: Path | str, ext: str) -> int | None:
    """The step of a spike dossier (ext "json") or rollout table (ext "jsonl"), None for any other name."""
    m = _STEP_FILE.fullmatch(Path(path).name)
    return int(m[1]) if m and m[2] == ext else None


def eval_table_name(task: str, seed: int) -> str:
    """`glasslab eval`'s answers for a task and seed: `countdown-seed0.jsonl` (':' and '/' in a task become '-')."""
    return f"{task.replace(':', '-').replace('/', '-')}-seed{seed}.jsonl"


def parse_eval_table(path: Path | str) -> tuple[str, int] | None:
    """(task as written in the name, seed) of an eval table, None for any other name."""
    m = _EVAL_TABLE.fullmatch(Path(path).name)
    return (m[1], int(m[2])) if m else None
