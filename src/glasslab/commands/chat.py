"""`glasslab chat`: talk to a run's chat model, in a terminal session or one message at a time."""

from __future__ import annotations

from typing import Annotated

import typer

from glasslab.commands.options import Json, NumBeams, RunArg
from glasslab.errors import GlasslabError
from glasslab.ui import console, emit_json


def chat(
    run_dir: RunArg,
    prompt: Annotated[str | None, typer.Option(help="answer this one message and exit")] = None,
    system: Annotated[str | None, typer.Option(help='a system prompt, e.g. "Use the calculator."')] = None,
    temperature: Annotated[float, typer.Option(help="0 for greedy")] = 0.8,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass")] = 0.95,
    top_k: Annotated[int | None, typer.Option(help="keep the k most likely tokens")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="tokens per answer")] = 64,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    num_beams: NumBeams = 1,
    json_: Json = False,
) -> None:
    """Talk to a run's newest checkpoint: streamed answers, multi-turn, calculator tool calls shown."""
    import sys

    from rich.console import Console

    from glasslab.chat.format import Message
    from glasslab.chat.repl import final_text, repl, reply
    from glasslab.stages.common import load_model
    from glasslab.track.rundir import RunDir

    if num_beams < 1:
        raise GlasslabError(f"--num-beams must be at least 1, got {num_beams}")
    if json_ and prompt is None:
        raise GlasslabError("--json needs --prompt: the interactive chat has no JSON form")
    model, tok, _ = load_model(RunDir.open(run_dir))
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
        emit_json({"prompt": prompt, "reply": final_text(turns)})
    else:
        out.print()
