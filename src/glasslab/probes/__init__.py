"""Probes: plug-ins (`glasslab.train.loop.Hook`s) that see inside every training step, in any stage.

    grads.py        grad / weight / update norms, update ratio, Adam moments, per tensor and per block
    forward.py      one no-grad forward of the objective's fixed probe rows, with temporary hooks for:
    attention.py      entropy, max logit and mass on <|bos|> per layer and head
    activations.py    per-block output RMS / max / kurtosis, output-logit max and log Z
    positions.py    validation loss by log-spaced token position bucket with 95% intervals
    router.py       MoE routing: load per expert, MaxVio, router entropy, gates, biases, dead experts, churn
    spikes.py       loss / grad-norm spike detector, spike dossiers, first non-finite module
    view.py         the `glasslab probes RUN` terminal view

Probes never touch the model's forward and need nothing from the batch itself: what they need from a stage
comes from the objective's optional methods (see `glasslab.train.loop.Objective`), and a probe whose
method is missing skips itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the probes import torch; `glasslab probes RUN` (view.py) reads files only
    from glasslab.config import Config
    from glasslab.data.tokenizer import Tokenizer
    from glasslab.track.rundir import RunDir
    from glasslab.train.loop import Hook


def build_probes(cfg: Config, run: RunDir, tokenizer: Tokenizer | None = None) -> list[Hook]:
    """The hooks the `probes` config section asks for: none with mode "off", every probe at every step
    with "full". `run` receives spike dossiers and events; `tokenizer` decodes a spike's worst tokens."""
    from glasslab.probes.forward import ForwardProbe
    from glasslab.probes.grads import GradProbe
    from glasslab.probes.positions import LossByPosition
    from glasslab.probes.router import RouterProbe
    from glasslab.probes.spikes import SpikeProbe

    p = cfg.probes
    if p.mode == "off":
        return []
    if p.mode == "full":
        p = p.model_copy(
            update={
                "grads_every": 1,
                "attention_every": 1,
                "activations_every": 1,
                "router_every": 1,
                "router_churn_every": 1,
                "loss_by_position": True,
                "spikes": True,
            }
        )
    hooks: list[Hook] = []
    if p.grads_every:
        hooks.append(GradProbe(p.grads_every))
    if p.spikes:
        hooks.append(SpikeProbe(p, run, tokenizer))
    if p.attention_every or p.activations_every:
        ids = {"pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id} if tokenizer else {}
        hooks.append(ForwardProbe(p.attention_every, p.activations_every, **ids))
    if p.loss_by_position:
        hooks.append(LossByPosition(p.position_every, p.position_windows))
    if cfg.model.moe.n_experts and p.router_every:
        hooks.append(RouterProbe(p.router_every, p.router_churn_every, p.router_dead_window))
    return hooks
