"""`glasslab chat`: talk to a run's chat model, in a terminal session or one message at a time."""

from __future__ import annotations

from typing import Annotated

import typer

from glasslab.commands.options import CheckpointStage, CheckpointStep, Json, NumBeams, RunArg
from glasslab.errors import GlasslabError
from glasslab.ui import console, emit_json


def chat(
    run_dir: RunArg,
    prompt: Annotated[str | None, typer.Option(help="answer this one message and exit")] = None,
    system: Annotated[str | None, typer.Option(help='a system prompt, e.g. "Use the calculator."')] = None,
    temperature: Annotated[float, typer.Option(min=0, help="0 for greedy")] = 0.8,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass, in (0, 1]")] = 0.95,
    top_k: Annotated[int | None, typer.Option(min=1, help="keep the k most likely tokens")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens per answer")] = 64,
    seed: Annotated[int, typer.Option(min=0, help="sampling seed")] = 0,
    stage: CheckpointStage = None,
    step: CheckpointStep = None,
    num_beams: NumBeams = 1,
    json_: Json = False,
) -> None:
    """Talk to a run's checkpoint (the newest, or --stage/--step): streamed answers, multi-turn, calculator tool
    calls shown."""
    import sys

    from rich.console import Console

    from glasslab.chat.format import Message
    from glasslab.chat.repl import final_text, repl, reply
    from glasslab.commands.options import check_top_p
    from glasslab.stages.common import checkpoint_info, choose_checkpoint, load_model
    from glasslab.track.rundir import RunDir

    if num_beams < 1:
        raise GlasslabError(f"--num-beams must be at least 1, got {num_beams}")
    if json_ and prompt is None:
        raise GlasslabError("--json needs --prompt: the interactive chat has no JSON form")
    check_top_p(top_p)
    run = RunDir.open(run_dir)
    checkpoint = choose_checkpoint(run, stage, step)
    model, tok, _ = load_model(run, checkpoint=checkpoint)
    out = Console(file=sys.stdout, highlight=False)
    sampling = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams
    )
    if prompt is None:
        repl(model, tok, system=system, seed=seed, out=out, ui=console, **sampling)
        return
    history = [*([Message("system", system)] if system else []), Message("user", prompt)]
    turns, _ = reply(model, tok, history, seed=seed, console=None if json_ else out, **sampling)
    if json_:
        emit_json({"prompt": prompt, "reply": final_text(turns), **checkpoint_info(checkpoint)})
    else:
        out.print()
