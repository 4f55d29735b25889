"""`glasslab probes RUN`: the latest probe values per block, loss by position, the spike dossiers, and where a
profiled step's time went (`--profile N`).

Reads only the run directory (metrics, spikes/*.json and profile/<stage>/summary.json), so it works on a finished run and, through the
WAL metric store, on one that is still training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.table import Table

from glasslab.errors import GlasslabError
from glasslab.probes.names import natural_key, unit_of
from glasslab.track.layout import (
    ACTIVATION_FAMILIES,
    ATTENTION_FAMILIES,
    ATTN_BOS,
    ATTN_ENTROPY,
    ATTN_ENTROPY_NORM,
    ATTN_MAX_LOGIT,
    GRAD_NORM,
    LOSS_BY_POS,
    LOSS_BY_POS_CI95,
    MOE_FAMILY,
    UPDATE_RATIO,
    WEIGHT_NORM,
    family_of,
    metric,
)
from glasslab.track.metrics import read_metrics
from glasslab.track.rundir import RunDir
from glasslab.ui import console

BLOCK_COLUMNS = [
    GRAD_NORM,
    UPDATE_RATIO,
    WEIGHT_NORM,
    ATTN_ENTROPY,
    ATTN_ENTROPY_NORM,
    ATTN_MAX_LOGIT,
    ATTN_BOS,
    *ACTIVATION_FAMILIES,
]
PREFIX = metric(MOE_FAMILY, "")  # "moe/"
HEAD = re.compile(r".+\.h\d+")  # attention metrics per head: attn_entropy/blocks.2.h1
# MoE router metrics per layer (probes/router.py, names under PREFIX "moe/"), and per expert (load, bias)
ROUTER_COLUMNS = ["maxvio", "cv", "dropped", "entropy", "entropy_mean", "diversity", "top1_gate", "dead", "churn"]
ROUTER_COLUMNS += ["eval_maxvio"]
EXPERT = re.compile(r"(?P<layer>.+)\.e(?P<expert>\d+)")
GLOBAL_METRICS = [
    "optim/grad_norm",
    "optim/clipped",
    "logits/max",
    "logits/log_z_mean",
    "spike/loss_score",
    "spike/grad_norm_score",
]


def probe_summary(run_path: Path) -> dict:
    """Everything the view shows, as plain data (what `--json` prints): per block, the latest value and step of
    each per-block metric (and per attention head); the latest loss by position; a few global values; every
    dossier in spikes/; each profiled stage's time by part of a step."""
    run = RunDir.open(Path(run_path))
    run_path = run.path
    table = read_metrics(run_path)
    latest: dict[str, dict] = {}
    for name, step, stage, value in zip(*(table[c].to_pylist() for c in ("name", "step", "stage", "value"))):
        latest[name] = {"value": value, "step": step, "stage": stage}  # canonical order: the last one wins
    blocks: dict[str, dict] = {}
    heads: dict[str, dict] = {}
    for name, entry in latest.items():
        kind, _, target = name.partition("/")
        if kind in BLOCK_COLUMNS and target and unit_of(target) == target:
            blocks.setdefault(target, {})[kind] = entry
        elif kind in ATTENTION_FAMILIES and HEAD.fullmatch(target):
            heads.setdefault(target, {})[kind] = entry
    by_pos = {n.partition("/")[2]: e for n, e in latest.items() if family_of(n) == LOSS_BY_POS}
    ci95 = {n.partition("/")[2]: e for n, e in latest.items() if family_of(n) == LOSS_BY_POS_CI95}
    router: dict[str, dict] = {}
    for name, entry in latest.items():
        kind, _, target = name.removeprefix(PREFIX).partition("/")
        if not name.startswith(PREFIX) or not target:
            continue
        if kind in ROUTER_COLUMNS:
            router.setdefault(target, {})[kind] = entry
        elif kind in ("load", "bias") and (m := EXPERT.fullmatch(target)):
            experts = router.setdefault(m["layer"], {}).setdefault(kind, {})
            experts[int(m["expert"])] = entry
    spikes = [json.loads(p.read_text()) for _, p in run.spike_files()]
    return {
        "run": str(run_path),
        "blocks": {b: blocks[b] for b in sorted(blocks, key=natural_key)},
        "heads": {h: heads[h] for h in sorted(heads, key=natural_key)},
        "loss_by_pos": {k: by_pos[k] for k in sorted(by_pos)},
        "loss_by_pos_ci95": {k: ci95[k] for k in sorted(ci95)},  # half-widths of the 95% intervals
        "router": {layer: router[layer] for layer in sorted(router, key=natural_key)},
        "global": {n: latest[n] for n in GLOBAL_METRICS if n in latest},
        "spikes": spikes,
        "profile": run.read_profiles(),
    }


def render(summary: dict, spike_step: int | None = None) -> None:
    """Rich tables on the console: blocks, loss by position, dossiers, and one dossier in full."""
    chosen = pick_dossier(summary, spike_step) if summary["spikes"] or spike_step is not None else None
    for stage, prof in summary.get("profile", {}).items():
        _profile_table(stage, prof)
    if not (summary["blocks"] or summary["spikes"] or summary["router"] or summary.get("profile")):
        console.print(f"no probe metrics in {summary['run']} yet (probes off, or the run has not logged a probe step)")
        return
    if summary["blocks"]:
        _blocks_table(summary)
    if summary["router"]:
        _router_table(summary)
    if summary["loss_by_pos"]:
        step = next(iter(summary["loss_by_pos"].values()))["step"]
        table = Table("positions", *summary["loss_by_pos"], title=f"validation loss by position, step {step}")
        table.add_row("val loss", *(f"{e['value']:.4f}" for e in summary["loss_by_pos"].values()))
        half = summary.get("loss_by_pos_ci95", {})
        table.add_row("± 95%", *(f"{half[k]['value']:.4f}" if k in half else "" for k in summary["loss_by_pos"]))
        console.print(table)
    if summary["global"]:
        console.print(
            "  ".join(f"{n} [bold]{e['value']:.4g}[/] (step {e['step']})" for n, e in summary["global"].items())
        )
    if chosen is not None:
        _spikes_table(summary["spikes"])
        _dossier(chosen)


def pick_dossier(summary: dict, step: int | None) -> dict:
    """The dossier of `step`, or the latest one."""
    if not summary["spikes"]:
        raise GlasslabError(f"no spike dossiers in {summary['run']}: drop --spike")
    chosen = [d for d in summary["spikes"] if step is None or d["step"] == step]
    if not chosen:
        steps = ", ".join(str(d["step"]) for d in summary["spikes"])
        raise GlasslabError(f"no spike dossier at step {step}: choose one of {steps}")
    return chosen[-1]


def _fmt(entry: dict | None) -> str:
    return "" if entry is None else f"{entry['value']:.4g}"


def _blocks_table(summary: dict) -> None:
    columns = [c for c in BLOCK_COLUMNS if any(c in m for m in summary["blocks"].values())]
    steps = {c: max(m[c]["step"] for m in summary["blocks"].values() if c in m) for c in columns}
    table = Table("block", *(f"{c}\n@{steps[c]}" for c in columns), title=f"latest probe values: {summary['run']}")
    for block, metrics in summary["blocks"].items():
        table.add_row(block, *(_fmt(metrics.get(c)) for c in columns))
    console.print(table)


def _router_table(summary: dict) -> None:
    """The latest router metrics, one row per MoE layer; then each expert's load share and bias per layer."""
    layers = summary["router"]
    columns = [c for c in ROUTER_COLUMNS if any(c in m for m in layers.values())]
    table = Table("layer", *(c.replace("_", "\n") for c in columns), title="MoE routing (latest values)")
    for layer, metrics in layers.items():
        table.add_row(layer, *(_fmt(metrics.get(c)) for c in columns))
    console.print(table)
    n_experts = max((len(m.get("load", {})) for m in layers.values()), default=0)
    if not n_experts:
        return
    table = Table("layer", *(f"e{k}" for k in range(n_experts)), title="load share (and bias) per expert")
    for layer, metrics in layers.items():
        load, bias = metrics.get("load", {}), metrics.get("bias", {})
        cells = [
            f"{load[k]['value']:.2f}" + (f" ({bias[k]['value']:+.3f})" if k in bias else "") if k in load else ""
            for k in range(n_experts)
        ]
        table.add_row(layer, *cells)
    console.print(table)


def _profile_table(stage: str, prof: dict) -> None:
    """Time by part of a profiled step, and the costliest ops."""
    compiled = ", compiled" if prof.get("compiled") else ""
    title = f"where {stage}'s step time goes: {prof['steps']} profiled steps, {prof['step_ms']:.1f} ms/step{compiled}"
    table = Table("part", "ms/step", "share", title=title)
    for name, part in prof["parts"].items():
        table.add_row(name, f"{part['ms_per_step']:.2f}", f"{part['share']:.1%}")
    console.print(table)
    ops = Table("op", "self ms/step", "calls/step", title=f"{stage}: ops with the most self time")
    for op in prof["top_ops"][:8]:
        ops.add_row(op["op"], f"{op['self_ms_per_step']:.2f}", f"{op['calls_per_step']:.0f}")
    console.print(ops)


def _spikes_table(dossiers: list[dict]) -> None:
    table = Table("step", "stage", "kind", "signal", "first to move", "worst rows", title="spike dossiers (spikes/)")
    for d in dossiers:
        if d["kind"] == "nonfinite":
            info = d["nonfinite"]
            signal = f"{info['what']} non-finite"
            moved = info["first_nonfinite_module"] or ", ".join(info["nonfinite_grads"][:3])
        else:
            signal = ", ".join(f"{k} {v['value']:.4g} (z {v['score']:.1f})" for k, v in d["signals"].items())
            first = d.get("first_departure")
            moved = f"{first['block']} {first['norm']} @{first['step']}" if first else "-"
        rows = ", ".join(str(r["row"]) for r in d.get("top_rows", [])[:4])
        table.add_row(str(d["step"]), d["stage"], d["kind"], signal, moved, rows)
    console.print(table)


def _dossier(d: dict) -> None:
    history = d["history"]
    if history:
        blocks = list(history[-1]["grad_norm"])
        table = Table(
            "step",
            "loss",
            *(f"{b}\ngrad | upd" for b in blocks),
            title=f"step {d['step']}: per-block norms before and at the {d['kind']}",
        )
        for r in history:
            upd = r["update_norm"] or {}
            cells = [
                f"{r['grad_norm'][b]:.3g} | {upd[b]:.3g}" if b in upd else f"{r['grad_norm'][b]:.3g} | -"
                for b in blocks
            ]
            table.add_row(str(r["step"]), f"{r['loss']:.4g}", *cells)
        console.print(table)
    if d.get("top_tokens"):
        table = Table("row", "pos", "loss", "context → target", title=f"step {d['step']}: highest-loss tokens")
        for t in d["top_tokens"]:
            text = f"{t['context']!r} → {t['target']!r}" if "context" in t else ""
            table.add_row(str(t["row"]), str(t["pos"]), f"{t['loss']:.3f}", text)
        console.print(table)
