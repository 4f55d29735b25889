"""`glasslab export`: a run's model as a standard Hugging Face checkpoint (Llama, Qwen2 or Qwen3 architecture),
for transformers, lm-evaluation-harness, vLLM and llama.cpp."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glasslab.commands.options import Json, RunArg
from glasslab.ui import console, emit_json


def export(
    run_dir: RunArg,
    out: Annotated[Path, typer.Option(help="the directory to write (new or empty)")],
    stage: Annotated[str | None, typer.Option(help="pretrain | sft | rl (default: the newest stage)")] = None,
    json_: Json = False,
) -> None:
    """Export a run's newest checkpoint as a Hugging Face model directory loadable with no custom code."""
    import json

    from glasslab.interop.hf_export import export_run
    from glasslab.track.rundir import RunDir

    path = export_run(RunDir.open(run_dir), stage, out)
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    if json_:
        emit_json({"out": str(out), "checkpoint": str(path), "architecture": architecture})
    else:
        console.print(f"exported {path} to {out} as {architecture}", highlight=False)
