"""`glasslab probes RUN`: what the probes saw, in the terminal or as JSON."""

from __future__ import annotations

from typing import Annotated

import typer

from glasslab.commands.options import Json, RunArg


def probes(
    run_dir: RunArg,
    spike: Annotated[
        int | None, typer.Option(min=0, help="show only the dossier of this step (default: all, the latest in full)")
    ] = None,
    json_: Json = False,
) -> None:
    """Latest per-block probe values (grad norm, update ratio, attention entropy, activation RMS...) and spike dossiers."""
    from glasslab.probes.view import pick_dossier, probe_summary, render
    from glasslab.ui import emit_json

    summary = probe_summary(run_dir)
    if json_:
        emit_json(summary if spike is None else {**summary, "spikes": [pick_dossier(summary, spike)]})
        return
    render(summary, spike)
