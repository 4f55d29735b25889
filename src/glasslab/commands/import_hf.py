"""`glasslab import-hf`: a Hugging Face checkpoint directory (Llama, Qwen2, Qwen3, SmolLM, Mistral without a
sliding window) becomes a glasslab run that `sft`, `rl`, `eval` and `chat` take like any pretrained run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glasslab.commands.options import Json, Name, Overwrite, RunsDir
from glasslab.errors import GlasslabError
from glasslab.ui import console


def import_hf(
    directory: Annotated[Path, typer.Argument(help="a checkpoint directory: config.json, safetensors, tokenizer")],
    name: Name = None,
    block_size: Annotated[
        int, typer.Option(help="the context glasslab trains in (capped at the model's max_position_embeddings)")
    ] = 2048,
    runs_dir: RunsDir = Path("runs"),
    overwrite: Overwrite = False,
    json_: Json = False,
) -> None:
    """Import an open model (its weights, tokenizer and chat template) as a run of glasslab's GPT."""
    from glasslab.commands.common import finish
    from glasslab.interop.hf_import import import_checkpoint, read_checkpoint
    from glasslab.track.rundir import RunDir

    if not directory.is_dir():
        raise GlasslabError(f"{directory} is not a directory: pass a Hugging Face checkpoint directory")
    if block_size < 1:
        raise GlasslabError(f"--block-size must be at least 1, got {block_size}")
    imported = read_checkpoint(directory, block_size)  # everything is checked before the run exists
    run = RunDir.create(runs_dir / (name or f"hf-{directory.resolve().name}"), overwrite=overwrite)
    path = import_checkpoint(directory, run, imported)
    if not json_:
        m = imported.config.model
        console.print(
            f"imported {directory} ({m.n_layer} layers, width {m.n_embd}, vocabulary {m.vocab_size}) as {path}",
            highlight=False,
        )
    finish(run, json_)
