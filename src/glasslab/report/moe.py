"""The report's MoE section: the router probe's metrics (probes/router.py) for every stage that logged them."""

from __future__ import annotations

import re

import numpy as np

from glasslab.report import figures as F
from glasslab.report.html import paragraph, table
from glasslab.report.rundata import RunData, Series
from glasslab.report.sections import Claims, Section
from glasslab.track.layout import MOE_FAMILY, metric
from glasslab.track.layout import family_of as layout_family

_LAYER = re.compile(r"blocks\.\d+")
PER_LAYER = {  # family -> (title, what it means)
    "maxvio": ("MaxVio per batch", "max load / mean load - 1 over the step's training tokens: 0 = balanced"),
    "eval_maxvio": ("MaxVio on the fixed validation batches", "the same, over a set that never changes"),
    "cv": ("Coefficient of variation of the expert loads", "std / mean of the assignment counts"),
    "dead": ("Dead experts", "experts with no token over the last router_dead_window probed steps"),
    "dropped": ("Dropped assignments", "share of assignments over an expert's capacity"),
    "entropy": ("Router entropy per token (nats)", "how undecided the router is about each token"),
    "entropy_mean": ("Entropy of the mean routing distribution (nats)", "log E = every expert equally used"),
    "diversity": ("Expert diversity exp(H(load)) / E", "1 = every expert equally used, 1/E = one expert"),
    "top1_gate": ("Mean first-choice gate", "the weight of each token's first expert"),
    "churn": ("Routing churn", "share of probe-row tokens whose first expert changed since the last probe"),
}


def _layer_rows(m: dict[str, Series], family: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    prefix = metric(MOE_FAMILY, family, "")
    names = sorted((n for n in m if n.startswith(prefix)), key=F.natural_key)
    return [(n.removeprefix(prefix), m[n].steps, m[n].values) for n in names]


def moe_section(run: RunData, claims: Claims) -> Section | None:
    sec = Section(
        "moe",
        "Mixture of experts: the router",
        intro="Per MoE layer, from the training batches at every router probe step: how the tokens spread over the "
        "experts (heat map rows = layer.expert, colour = share of the step's assignments; 1/E is balance), how "
        "imbalanced that is (MaxVio), how sure the router is, and the auxiliary-loss-free balancing biases.",
    )
    for stage in run.stages:
        m = run.metrics[stage]
        claims.take(stage, [n for n in m if layout_family(n) == MOE_FAMILY])
        load = _layer_rows(m, "load")
        if load:
            sec.figure(
                F.heatmap(f"Load share per expert ({stage})", load, log=False, vmin=0.0, note="rows: layer.expert")
            )
            sec.html(_summary(m, stage))
        for family, (title, meaning) in PER_LAYER.items():
            rows = _layer_rows(m, family)
            if rows:
                sec.figure(F.lines(f"{title} ({stage})", rows, note=meaning))
        by_domain = _layer_rows(m, "domain_load")
        if by_domain:
            note = "rows: domain/layer.expert; share of each domain's validation tokens sent to the expert"
            sec.figure(
                F.heatmap(f"Load share per expert by data domain ({stage})", by_domain, log=False, vmin=0.0, note=note)
            )
        bias = _layer_rows(m, "bias")
        if bias and any(np.nanmax(np.abs(v)) > 0 for _, _, v in bias):
            sec.figure(F.heatmap(f"Selection bias per expert ({stage})", bias, log=False, note="rows: layer.expert"))
        losses = [(n, m[n].steps, m[n].values) for n in ("train/moe_aux_loss", "train/moe_z_loss") if n in m]
        if losses:
            sec.figure(F.lines(f"Router losses, summed over layers ({stage})", losses, note="1 = balanced (aux)"))
    return sec if sec.items else None


def _summary(m: dict[str, Series], stage: str) -> str:
    """Final MaxVio, diversity and dead experts per layer, with a warning when an expert died."""
    rows = []
    for layer, _, values in _layer_rows(m, "maxvio"):
        if not _LAYER.fullmatch(layer):
            continue
        final = {f: m.get(metric(MOE_FAMILY, f, layer)) for f in ("diversity", "dead", "eval_maxvio")}
        rows.append(
            (
                layer,
                float(values[-1]),
                float(np.nanmax(values)),
                *(s.last if s is not None else float("nan") for s in final.values()),
            )
        )
    measured = [r[4] for r in rows if np.isfinite(r[4])]
    if not measured:
        note = paragraph(f"The dead-expert window was never filled during {stage}: no dead-expert count.")
    elif sum(measured):
        note = paragraph(f"{int(sum(measured))} experts received no token over the last window of {stage}.", "warn")
    else:
        note = paragraph(f"Every expert received tokens over the last window of {stage}.", "ok")
    head = ["layer", "final MaxVio", "max MaxVio", "final diversity", "dead experts", "final eval MaxVio"]
    return note + table(head, rows)
