"""The sections of a run report, each built only from what the run logged.

Every builder claims the metric names it shows; whatever no builder claimed lands in "Other metrics",
so a metric family added later is still on the page before anyone writes a section for it.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from html import escape
from typing import Any

import numpy as np

from glasslab.report import figures
from glasslab.report.html import kv_table, paragraph, records_table, table
from glasslab.report.rundata import RunData, Series
from glasslab.track import layout

COLLAPSE_THRESHOLD = 0.15  # normalised attention entropy below this = a collapsed head
# Spike events of one stage this many steps apart or fewer are one burst in the report: the detector's own
# episodes end sooner, and a training instability that keeps returning reads better as one line with a count.
SPIKE_BURST_GAP = 50

# How the probe families of glasslab.track.layout are shown: one entry per family, in the order shown.
GRADIENT_TITLES = {
    layout.GRAD_NORM: "Gradient norm",
    layout.UPDATE_RATIO: "Update / weight ratio",
    layout.UPDATE_NORM: "Update norm",
    layout.WEIGHT_NORM: "Weight norm",
    layout.ADAM_M_NORM: "Adam first-moment norm",
    layout.ADAM_V_NORM: "Adam second-moment norm",
}
ATTENTION_TITLES = {
    layout.ATTN_ENTROPY_NORM: (
        "Normalised attention entropy",
        "entropy / ln(number of keys the query can attend): 1 = uniform, 0 = one key; mean over the real queries "
        "that can attend 2 or more keys (query 0 and padding left out)",
    ),
    layout.ATTN_ENTROPY: (
        "Attention entropy (nats)",
        "entropy of each query's attention row, mean over the real queries that can attend 2 or more keys",
    ),
    layout.ATTN_MAX_LOGIT: ("Maximum attention logit", "largest pre-softmax q·k/√d: its growth precedes instability"),
    layout.ATTN_BOS: (
        "Attention on <|bos|> (sink)",
        "attention mass on the <|bos|> keys in view, mean over the queries that have one in view",
    ),
}
ACTIVATION_TITLES = {  # family -> (title, log scale)
    layout.ACT_RMS: ("Residual stream RMS", False),
    layout.ACT_MAX: ("Residual stream max |x|", True),
    layout.ACT_KURTOSIS: ("Residual stream kurtosis", True),
}
_LAYER = re.compile(r"blocks\.\d+")
_HEAD = re.compile(r"blocks\.\d+\.h\d+")


@dataclass
class Section:
    id: str
    title: str
    items: list[dict[str, Any]] = field(default_factory=list)  # figures, or {"type": "html", "html": ...}
    intro: str = ""

    def html(self, text: str) -> None:
        self.items.append({"type": "html", "html": text})

    def figure(self, fig: dict[str, Any]) -> None:
        self.items.append(fig)


class Claims:
    """Which (stage, metric) pairs some section shows."""

    def __init__(self) -> None:
        self.taken: set[tuple[str, str]] = set()

    def take(self, stage: str, names: Iterable[str]) -> list[str]:
        names = list(names)
        self.taken.update((stage, n) for n in names)
        return names

    def free(self, stage: str, names: Iterable[str]) -> list[str]:
        return [n for n in names if (stage, n) not in self.taken]


def _with_prefix(metrics: dict[str, Series], prefix: str) -> list[str]:
    return sorted((n for n in metrics if n.startswith(prefix)), key=figures.natural_key)


def _family(metrics: dict[str, Series], family: str) -> list[str]:
    """The metrics of one family (glasslab.track.layout), in natural order."""
    return _with_prefix(metrics, layout.metric(family, ""))


def _rows(metrics: dict[str, Series], names: list[str], prefix: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(n[len(prefix) :], metrics[n].steps, metrics[n].values) for n in names]


def _lines_of(metrics: dict[str, Series], names: list[str], title: str, **kw: Any) -> dict[str, Any]:
    return figures.lines(title, [(n, metrics[n].steps, metrics[n].values) for n in names], **kw)


def _stage_label(stage: str) -> str:
    return {
        layout.PRETRAIN: "pretraining",
        layout.SFT: "supervised fine-tuning",
        layout.RL: "reinforcement learning",
        layout.EVAL: "final evaluation",
    }.get(stage, stage)


# Overview and config


def overview(run: RunData) -> Section:
    m = run.manifest
    sec = Section("overview", f"Run {run.name}")
    keys = [
        "status",
        "message",
        "pipeline",
        "stages_done",
        "stage",
        "last_step",
        "preset",
        "seed",
        "device",
        "parent",
        "init",
        "created",
        "updated",
        "wall_time_s",
        "glasslab_version",
        "git_commit",
        "torch_version",
    ]
    sec.html(kv_table([(k, m[k]) for k in keys if m.get(k) not in (None, [], "")]))
    headline = []
    for stage in run.stages:
        names = [
            n for n in ("train/loss", "val/loss", "val/bpb", "rl/reward_mean", "rl/kl_ref") if n in run.metrics[stage]
        ]
        names += sorted(n for n in _family(run.metrics[stage], layout.EVAL_FAMILY) if n.endswith("/accuracy"))
        headline += [(stage, n, run.metrics[stage][n].steps[-1], run.metrics[stage][n].last) for n in names]
    if headline:
        sec.html("<h3>Final values</h3>" + table(["stage", "metric", "step", "value"], headline))
    warnings = [e for e in run.events if e.get("kind") in ("hacking", "spike", "nonfinite", "diverged")]
    if warnings:
        bursts = len(spike_bursts(run.events))
        text = ", ".join(
            f"{n} {k}" + (f" (in {bursts} bursts)" if k == "spike" and bursts < n else "")
            for k, n in Counter(e["kind"] for e in warnings).items()
        )
        sec.html(f'<p class="warn">Warnings recorded: {escape(text)}. See <a href="#events">Events</a>.</p>')
    return sec


def config_section(run: RunData) -> Section | None:
    if not run.config_text:
        return None
    sec = Section("config", "Configuration", intro="The resolved config (config.toml): every setting this run used.")
    model = run.config.get("model", {})
    if model:
        arch = (
            f"{model.get('n_layer')} layers, {model.get('n_head')} heads, width {model.get('n_embd')}, "
            f"context {model.get('block_size')}, vocabulary {model.get('vocab_size')}, MLP {model.get('mlp')}, "
            f"QK-norm {'on' if model.get('qk_norm') else 'off'}"
        )
        sec.html(paragraph(f"Model: {arch}."))
    rows = []
    for stage in run.manifest.get("pipeline") or run.stages:  # [train] is pretraining's; [sft.train], [rl.train]
        t = run.config.get("train", {}) if stage == layout.PRETRAIN else run.config.get(stage, {}).get("train", {})
        if t:
            rows.append(
                (
                    stage,
                    t.get("steps"),
                    t.get("batch_size"),
                    t.get("optimizer"),
                    t.get("lr"),
                    t.get("schedule"),
                    t.get("warmup_steps"),
                    t.get("weight_decay"),
                    t.get("grad_clip"),
                    t.get("z_loss"),
                )
            )
    if rows:
        sec.html(
            table(
                [
                    "stage",
                    "steps",
                    "batch",
                    "optimizer",
                    "lr",
                    "schedule",
                    "warmup",
                    "weight decay",
                    "grad clip",
                    "z-loss",
                ],
                rows,
            )
        )
    sec.html(f"<details><summary>config.toml (everything)</summary><pre>{escape(run.config_text)}</pre></details>")
    return sec


# Per-stage training curves, evaluation and RL


def stage_section(run: RunData, stage: str, claims: Claims) -> Section | None:
    m = run.metrics[stage]
    sec = Section(f"stage-{stage}", f"Stage: {_stage_label(stage)} ({stage})")

    def add(title: str, names: list[str], **kw: Any) -> None:
        present = claims.take(stage, [n for n in names if n in m])
        if present:
            sec.figure(_lines_of(m, present, title, **kw))

    _rl_figures(run, stage, sec, claims, add)
    add("Loss", ["train/loss", "val/loss"], ylabel="nats / token")
    add("Validation bits per byte", ["val/bpb"])
    add("Validation perplexity", ["val/ppl"], ylog=True)
    add("z-loss term (mean squared log Z)", ["train/z_loss"])
    for name in claims.free(stage, _family(m, layout.TRAIN_FAMILY) + _family(m, layout.VAL_FAMILY)):
        add(name, [name])
    add("Learning rate", ["optim/lr"])
    if "optim/grad_norm" in m:
        note = ""
        if "optim/clipped" in m:
            clipped = m["optim/clipped"].values
            note = f"clipping fired on {int(np.nansum(clipped > 0.5))} of {len(clipped)} steps"
            claims.take(stage, ["optim/clipped"])
        add("Gradient norm (before clipping)", ["optim/grad_norm"], ylog=True, note=note)
    for name in claims.free(stage, _family(m, layout.OPTIM_FAMILY)):
        add(name, [name])
    _eval_items(stage, m, sec, claims)
    samples = [s for s in run.samples if s.get("stage") == stage]
    if samples:
        sec.html(
            f"<h3>Samples ({len(samples)} logged, last shown)</h3>"
            + records_table(samples[-4:], first=("step", "prompt", "completion"))
        )
    if not sec.items:
        return None
    return sec


def _rl_figures(run: RunData, stage: str, sec: Section, claims: Claims, add: Callable[..., None]) -> None:
    m = run.metrics[stage]
    if not any(layout.family_of(n) == layout.RL_FAMILY for n in m):
        return
    hacking = [e for e in run.events if e.get("kind") == "hacking" and e.get("stage") in (stage, None)]
    if hacking:
        sec.html(
            '<div class="warn"><b>Reward-hacking warnings</b>'
            + records_table(hacking, limit=50, first=("step", "detector", "message"))
            + "</div>"
        )
    add("Reward (mean and per function)", ["rl/reward_mean", *_with_prefix(m, "rl/reward/"), "rl/reward_std"])
    add(
        "KL divergence",
        ["rl/kl_ref", "rl/kl_old"],
        note="rl/kl_ref: to the frozen reference policy; rl/kl_old: to the sampling policy",
    )
    add("Policy entropy (nats / token)", ["rl/entropy"])
    add("Completion length (tokens)", ["rl/completion_len_mean", "rl/completion_len_min", "rl/completion_len_max"])
    add("Truncated completions (share)", ["rl/truncated_ratio"])
    add("Clip ratios", ["rl/clip_ratio_low", "rl/clip_ratio_high", "rl/clip_ratio_region"])
    add("Groups whose rewards do not vary (share)", ["rl/frac_reward_zero_std"])
    add("Advantages", _with_prefix(m, "rl/advantage_"))
    add("Repetition (n-gram repeat rate)", ["rl/repeat_rate"])
    for name in claims.free(stage, _family(m, layout.RL_FAMILY)):
        add(name, [name])
    if stage == layout.RL and run.rollouts:
        step = max(run.rollouts)
        source = f"{layout.ROLLOUTS}/{layout.rollout_name(step)}"
        sec.html(
            f"<h3>Rollouts at step {step}</h3><p class='muted'>{source}; saved at steps "
            f"{', '.join(map(str, sorted(run.rollouts)))}</p>"
            + records_table(
                run.rollouts[step], limit=16, first=("prompt", "completion", "reward", "rewards", "advantage")
            )
        )


def _eval_items(stage: str, m: dict[str, Series], sec: Section, claims: Claims) -> None:
    """eval/<task>/<metric>: curves when logged at several steps, a table otherwise."""
    names = claims.take(stage, _family(m, layout.EVAL_FAMILY))
    by_task: dict[str, list[str]] = {}
    for n in names:
        by_task.setdefault(n.split("/")[1], []).append(n)
    rows = []
    for task, task_names in by_task.items():
        curves = [n for n in task_names if len(m[n].steps) > 1]
        if curves:
            sec.figure(
                _lines_of(
                    m, curves, f"Held-out evaluation: {task}", note="greedy accuracy and pass@k on held-out problems"
                )
            )
        rows += [(n, int(m[n].steps[-1]), m[n].last) for n in task_names if n not in curves]
    if rows:
        sec.html("<h3>Evaluation</h3>" + table(["metric", "step", "value"], rows))


def eval_files_section(run: RunData) -> Section | None:
    if not run.evals and not run.final_eval:
        return None
    sec = Section(
        "eval-records",
        "Evaluation records",
        intro="The final held-out evaluation of each chat stage (eval/final.json) and per-problem results "
        "saved by `glasslab eval` (eval/<task>-seed<S>.jsonl).",
    )
    for stage, by_env in run.final_eval.items():
        for env, result in by_env.items():
            if isinstance(result, dict):
                rows = ((k, v) for k, v in result.items() if k != "records")
                sec.html(f"<h3>After {escape(stage)}: {escape(env)}</h3>" + kv_table(rows))
    for key, records in run.evals.items():
        sec.html(
            f"<h3>{escape(key)}</h3>"
            + records_table(records, limit=10, first=("prompt", "answer", "completion", "rewards"))
        )
    return sec


# Probe families


def gradients_section(run: RunData, claims: Claims) -> Section | None:
    sec = Section(
        "gradients",
        "Gradients and updates",
        intro="Per block (rows) over steps (columns), log colour scale. Look for a block whose gradient or "
        "update ratio departs from the others; update/weight ratios near 1e-3 are typical for healthy training.",
    )
    for stage in run.stages:
        m = run.metrics[stage]
        for fam, title in GRADIENT_TITLES.items():
            prefix = f"{fam}/"
            names = claims.take(stage, _with_prefix(m, prefix))
            coarse = [n for n in names if _LAYER.fullmatch(n[len(prefix) :]) or "blocks." not in n]
            fine = [n for n in names if n not in coarse]
            for group, level in ((coarse, "per block"), (fine, "per parameter")):
                if group:
                    sec.figure(figures.heatmap(f"{title} {level} ({stage})", _rows(m, group, prefix), log=True))
    return sec if sec.items else None


def attention_section(run: RunData, claims: Claims) -> Section | None:
    sec = Section(
        "attention",
        "Attention",
        intro=f"Per layer and head over steps, on a fixed probe batch. A head whose normalised entropy falls below "
        f"{COLLAPSE_THRESHOLD} attends to almost a single key (collapse): such cells are outlined in red.",
    )
    for stage in run.stages:
        m = run.metrics[stage]
        for fam, (title, meaning) in ATTENTION_TITLES.items():
            prefix = f"{fam}/"
            names = claims.take(stage, _with_prefix(m, prefix))
            heads = [n for n in names if _HEAD.fullmatch(n[len(prefix) :])]
            others = [n for n in names if n not in heads]
            normalised = fam == layout.ATTN_ENTROPY_NORM
            if heads:
                sec.figure(
                    figures.heatmap(
                        f"{title} per head ({stage})",
                        _rows(m, heads, prefix),
                        log=False,
                        threshold=COLLAPSE_THRESHOLD if normalised else None,
                        vmin=0.0 if normalised or fam == "attn_bos" else None,
                        vmax=1.0 if normalised or fam == "attn_bos" else None,
                        note=meaning,
                    )
                )
            if others:
                sec.figure(figures.lines(f"{title} per layer ({stage})", _rows(m, others, prefix), note=meaning))
            if normalised and (heads or others):
                sec.html(_collapse_summary(m, heads or others, stage))
    return sec if sec.items else None


def _collapse_summary(m: dict[str, Series], names: list[str], stage: str) -> str:
    rows = []
    for n in names:
        s = m[n]
        below = np.flatnonzero(s.values < COLLAPSE_THRESHOLD)
        if len(below):
            rows.append((n, int(s.steps[below[0]]), s.last, float(np.nanmin(s.values))))
    if not rows:
        return paragraph(
            f"No head's normalised attention entropy fell below {COLLAPSE_THRESHOLD} during {stage}.", "ok"
        )
    return (
        f'<p class="warn">{len(rows)} of {len(names)} heads collapsed (normalised entropy below {COLLAPSE_THRESHOLD}) '
        f"during {escape(stage)}:</p>" + table(["head", "first step below", "final", "minimum"], rows)
    )


def activations_section(run: RunData, claims: Claims) -> Section | None:
    sec = Section(
        "activations",
        "Activations and logits",
        intro="Residual-stream statistics after each block, and output-logit statistics, on the probe batch. "
        "Growing max |x| or kurtosis means outlier features; a drifting mean log Z means the logits drift as a whole.",
    )
    for stage in run.stages:
        m = run.metrics[stage]
        for fam, (title, ylog) in ACTIVATION_TITLES.items():
            prefix = f"{fam}/"
            names = claims.take(stage, _with_prefix(m, prefix))
            coarse = [n for n in names if _LAYER.fullmatch(n[len(prefix) :]) or "blocks." not in n]
            fine = [n for n in names if n not in coarse]
            if coarse:
                sec.figure(figures.lines(f"{title} ({stage})", _rows(m, coarse, prefix), ylog=ylog))
            if fine:
                sec.figure(figures.heatmap(f"{title}, finer ({stage})", _rows(m, fine, prefix), log=ylog))
        titles = {
            "logits/max": "Maximum output logit",
            "logits/log_z_mean": "Mean log Z (log-partition of the output logits)",
        }
        for name in claims.take(stage, _family(m, layout.LOGITS_FAMILY)):
            sec.figure(_lines_of(m, [name], f"{titles.get(name, name)} ({stage})"))
    return sec if sec.items else None


def positions_section(run: RunData, claims: Claims) -> Section | None:
    sec = Section(
        "positions",
        "Loss by token position",
        intro="Validation loss per log-spaced position bucket (0, 1, 2-3, 4-7, ...), with its 95% interval over "
        "validation windows as a band: later positions see more context, so their loss should fall lower; "
        "a flat curve means the model does not use its context.",
    )
    for stage in run.stages:
        m = run.metrics[stage]
        names = claims.take(stage, _family(m, layout.LOSS_BY_POS))
        halves = set(claims.take(stage, _family(m, layout.LOSS_BY_POS_CI95)))
        if not names:
            continue
        prefix = layout.metric(layout.LOSS_BY_POS, "")
        buckets = [(figures.position_bucket(n[len(prefix) :]), n) for n in names]
        if all(b is not None for b, _ in buckets):
            xs = np.array([(b[0] + b[1]) / 2 for b, _ in buckets])
            xlabel = "token position (bucket middle)"
        else:
            xs, xlabel = np.arange(len(buckets), dtype=float), "position bucket (in logging order)"
        order = np.argsort(xs, kind="stable")
        steps = np.unique(np.concatenate([m[n].steps for n in names]))
        chosen = steps[np.unique(np.linspace(0, len(steps) - 1, min(6, len(steps))).astype(int))]
        series = []
        for step in chosen:
            ys = np.array([_value_at(m[n], step) for _, n in buckets])
            half = np.array([_value_at(m[_ci_name(n)], step) if _ci_name(n) in halves else np.nan for _, n in buckets])
            series.append((f"step {step}", xs[order], ys[order], half[order]))
        labels = ", ".join(n[len(prefix) :] for _, n in buckets)
        sec.figure(
            figures.interval_lines(
                f"Loss by position ({stage})",
                series,
                xlabel=xlabel,
                ylabel="nats / token",
                note=f"buckets: {labels}; bands: 95% interval",
            )
        )
    return sec if sec.items else None


def _ci_name(name: str) -> str:
    """`loss_by_pos/004-007` -> `loss_by_pos_ci95/004-007`, the half-width of its 95% interval."""
    return layout.metric(layout.LOSS_BY_POS_CI95, name.removeprefix(layout.metric(layout.LOSS_BY_POS, "")))


def _value_at(s: Series, step: int) -> float:
    hit = np.flatnonzero(s.steps == step)
    return float(s.values[hit[-1]]) if len(hit) else float("nan")


# Spikes, events, timing, the rest


def spikes_section(run: RunData, claims: Claims) -> Section | None:
    sec = Section(
        "spikes",
        "Spikes",
        intro="A spike is a robust z-score (against the trend and MAD of recent steps) of the loss or the log "
        "gradient norm above the threshold. Each episode leaves a dossier: what every block did in the steps "
        "before, which block departed first, and which rows and tokens carried the loss.",
    )
    for stage in run.stages:
        names = claims.take(stage, _family(run.metrics[stage], layout.SPIKE_FAMILY))
        if names:
            sec.figure(
                _lines_of(
                    run.metrics[stage],
                    names,
                    f"Spike scores ({stage})",
                    note="robust z-scores; a dossier is written above the threshold",
                )
            )
    for d in run.spikes:
        head = f"{str(d.get('kind', 'spike')).capitalize()} at step {d.get('step')}" + (
            f" ({d['stage']})" if d.get("stage") else ""
        )
        sec.html(f"<h3>{escape(head)}</h3>")
        scalars = [(k, v) for k, v in d.items() if not isinstance(v, (dict, list))]
        if scalars:
            sec.html(kv_table(scalars))
        for key, value in d.items():
            if isinstance(value, (dict, list)):
                _dossier_part(sec, key, value, head)
    return sec if sec.items else None


def _dossier_part(sec: Section, key: str, value: Any, head: str) -> None:
    """Numeric histories become line charts, lists of records tables, anything else readable JSON."""
    histories = _histories(value)
    if histories:
        for sub, (x, series) in histories.items():
            title = f"{head}: {key}" + (f" / {sub}" if sub else "")
            sec.figure(figures.lines(title, [(label, x, y) for label, y in series.items()], ylog=True))
        return
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        sec.html(f"<h4>{escape(key)}</h4>" + records_table(value, limit=20))
    elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        sec.html(f"<h4>{escape(key)}</h4>" + records_table([{"": k, **v} for k, v in value.items()], limit=20))
    elif isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
        sec.html(f"<h4>{escape(key)}</h4>" + kv_table(value.items()))
    else:
        sec.html(
            f"<details><summary>{escape(key)}</summary><pre>{escape(json.dumps(value, indent=1)[:20000])}</pre></details>"
        )


def _is_numbers(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 1 and all(isinstance(x, (int, float)) or x is None for x in v)


def _histories(value: Any) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Recognise {name: [numbers]} (x: a 'steps' entry or the index) and [{step, <group>: {name: number}, ...}]."""

    def arr(v: list) -> np.ndarray:
        return np.array([np.nan if x is None else x for x in v], dtype=float)

    if isinstance(value, dict):
        lists = {k: v for k, v in value.items() if _is_numbers(v) and k not in ("steps", "step")}
        if lists and len({len(v) for v in lists.values()}) == 1:
            n = len(next(iter(lists.values())))
            steps = value.get("steps")
            x = arr(steps) if _is_numbers(steps) and len(steps) == n else np.arange(n, dtype=float)
            return {"": (x, {k: arr(v) for k, v in lists.items()})}
        return {}
    records = isinstance(value, list) and len(value) > 1 and all(isinstance(r, dict) and "step" in r for r in value)
    if records and any(isinstance(v, dict) for r in value for v in r.values()):  # per-step records of per-block norms
        x = np.array([float(r["step"]) for r in value])
        out = {}
        scalars = [
            k
            for k in value[0]
            if k != "step" and all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in value)
        ]
        if scalars:
            out[", ".join(scalars)] = (x, {k: arr([r.get(k) for r in value]) for k in scalars})
        for group in value[0]:
            inner = [r.get(group) for r in value]
            if all(isinstance(v, dict) or v is None for v in inner) and any(inner):
                names = sorted({k for v in inner if v for k in v}, key=figures.natural_key)
                out[group] = (x, {k: arr([(v or {}).get(k) for v in inner]) for k in names})
        return out
    return {}


def spike_bursts(events: list[dict]) -> list[list[dict]]:
    """Spike events in bursts: a spike event joins the last burst of its stage when it comes within
    SPIKE_BURST_GAP steps of that burst's latest event. Bursts are ordered by their first event."""
    bursts: list[list[dict]] = []
    latest: dict[Any, list[dict]] = {}
    for e in events:
        if e.get("kind") != "spike":
            continue
        burst = latest.get(e.get("stage"))
        step, last = e.get("step"), burst[-1].get("step") if burst else None
        if burst and isinstance(step, int) and isinstance(last, int) and step - last <= SPIKE_BURST_GAP:
            burst.append(e)
        else:
            latest[e.get("stage")] = [e]
            bursts.append(latest[e.get("stage")])
    return bursts


def _spike_score(e: dict) -> float:
    signals = e.get("signals")
    scores = [s.get("score") for s in signals.values() if isinstance(s, dict)] if isinstance(signals, dict) else []
    return max((x for x in scores if isinstance(x, (int, float))), default=-math.inf)


def events_section(run: RunData) -> Section | None:
    """One row per event, except that a burst of spike events is one row: how many, over which steps, and the
    message of its highest-scoring one, so a lone spike is not lost among dozens."""
    if not run.events:
        return None
    sec = Section("events", "Events", intro="Warnings and notices the run recorded (events.jsonl).")
    rows, classes = [], []
    first_of = {id(b[0]): b for b in spike_bursts(run.events)}
    for e in run.events:
        if e.get("kind") == "spike" and id(e) not in first_of:
            continue  # shown in its burst's row
        burst = first_of.get(id(e), [e])
        when = (
            datetime.fromtimestamp(e["time"], timezone.utc).strftime("%H:%M:%S")
            if isinstance(e.get("time"), (int, float))
            else ""
        )
        if len(burst) > 1:
            top = max(burst, key=_spike_score)
            steps = [b.get("step") for b in burst]
            message = f"{len(burst)} spike events at steps {steps[0]}-{steps[-1]}; highest score: {top.get('message')}"
            rows.append((when, "spike", e.get("stage"), f"{steps[0]}-{steps[-1]}", message, {"steps": steps}))
        else:
            extra = {k: v for k, v in e.items() if k not in ("time", "kind", "message", "step", "stage")}
            rows.append((when, e.get("kind"), e.get("stage"), e.get("step"), e.get("message"), extra or ""))
        classes.append("warnrow" if e.get("kind") in ("hacking", "spike", "nonfinite", "diverged") else "")
    sec.html(table(["time (UTC)", "kind", "stage", "step", "message", "details"], rows, row_classes=classes))
    return sec


def timing_section(run: RunData, claims: Claims) -> Section | None:
    sec = Section("timing", "Timing", intro="Wall time per stage (first to last logged metric) and throughput.")
    rows = []
    for stage in run.stages:
        m = run.metrics[stage]
        times = np.concatenate([s.times for s in m.values()])
        steps = max(int(s.steps.max()) for s in m.values())
        tps = m.get("throughput/tokens_per_s")
        step_s = m.get("time/step_s")
        mfu = m.get("throughput/mfu")
        rows.append(
            (
                stage,
                steps,
                float(times.max() - times.min()),
                float(np.nanmedian(tps.values)) if tps else None,
                float(np.nanmedian(step_s.values)) if step_s else None,
                f"{np.nanmedian(mfu.values):.2%}" if mfu else None,
            )
        )
        names = claims.take(stage, _family(m, layout.THROUGHPUT_FAMILY) + _family(m, layout.TIME_FAMILY))
        if "throughput/tokens_per_s" in names:
            sec.figure(_lines_of(m, ["throughput/tokens_per_s"], f"Throughput, tokens/s ({stage})"))
        parts = [n for n in names if layout.family_of(n) == layout.TIME_FAMILY]
        if parts:
            sec.figure(_lines_of(m, parts, f"Time per step, seconds ({stage})", ylog=True))
        for n in names:
            if layout.family_of(n) == layout.THROUGHPUT_FAMILY and n != "throughput/tokens_per_s":
                sec.figure(_lines_of(m, [n], f"{n} ({stage})"))
    if rows:
        header = ["stage", "last step", "wall time (s)", "median tokens/s", "median step time (s)", "median MFU"]
        sec.html(table(header, rows))
    return sec if rows else None


def profile_section(run: RunData) -> Section | None:
    """`--profile N`: each profiled stage's time by part of a step and its costliest ops (profile/<stage>/)."""
    if not run.profiles:
        return None
    sec = Section(
        "profile",
        "Where the time goes",
        intro="torch.profiler over a few steps of each profiled stage (--profile N): time by part of the step, and "
        "the ops with the most self time. The profiler slows every op a little: read the shares. The Chrome trace is "
        "profile/<stage>/trace.json (chrome://tracing or ui.perfetto.dev).",
    )
    for stage, summary in run.profiles.items():
        compiled = " (compiled: the forward's submodules are one graph)" if summary.get("compiled") else ""
        sec.html(f"<h3>{escape(stage)}: {summary['steps']} steps, {summary['step_ms']:.1f} ms per step{compiled}</h3>")
        rows = [(name, p["ms_per_step"], f"{p['share']:.1%}") for name, p in summary["parts"].items()]
        sec.html(table(["part", "ms per step", "share of step"], rows))
        ops = [(o["op"], o["self_ms_per_step"], o["calls_per_step"]) for o in summary["top_ops"]]
        sec.html(table(["op", "self ms per step", "calls per step"], ops))
    return sec


def other_section(run: RunData, claims: Claims) -> Section | None:
    sec = Section("other", "Other metrics", intro="Metrics no section above knows about, grouped by family.")
    for stage in run.stages:
        m = run.metrics[stage]
        free = claims.free(stage, sorted(m, key=figures.natural_key))
        families: dict[str, list[str]] = {}
        for n in free:
            families.setdefault(n.split("/")[0] if "/" in n else n, []).append(n)
        for fam, names in families.items():
            if len(names) <= 8:
                sec.figure(_lines_of(m, names, f"{fam} ({stage})"))
            else:
                prefix = f"{fam}/"
                rows = [(n.removeprefix(prefix), m[n].steps, m[n].values) for n in names]
                sec.figure(figures.heatmap(f"{fam} ({stage})", rows, log=False))
            claims.take(stage, names)
    return sec if sec.items else None


def build_sections(run: RunData) -> list[Section]:
    """All sections in reading order, empty ones left out."""
    from glasslab.report.moe import moe_section  # it builds on this module's Section and Claims

    claims = Claims()
    sections: list[Section | None] = [overview(run), config_section(run)]
    sections += [stage_section(run, stage, claims) for stage in run.stages]
    sections += [
        eval_files_section(run),
        gradients_section(run, claims),
        attention_section(run, claims),
        activations_section(run, claims),
        positions_section(run, claims),
        moe_section(run, claims),
        spikes_section(run, claims),
        timing_section(run, claims),
        profile_section(run),
        events_section(run),
        other_section(run, claims),
    ]
    return [s for s in sections if s is not None]
