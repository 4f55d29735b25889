"""`glasslab sample`: text from a run's checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from glasslab.commands.options import Json, NumBeams, RunArg
from glasslab.errors import GlasslabError
from glasslab.ui import console, emit_json


def sample(
    run_dir: RunArg,
    prompt: Annotated[str, typer.Option(help="text to continue")] = "\n",
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 200,
    temperature: Annotated[float, typer.Option(help="0 for greedy")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="keep the k most likely tokens")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass")] = 0.95,
    n: Annotated[int, typer.Option(help="number of samples")] = 1,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    num_beams: NumBeams = 1,
    json_: Json = False,
) -> None:
    """Generate text from a run's newest checkpoint; with --num-beams, the n best beams."""
    from glasslab.model.beam import beam_search
    from glasslab.model.generate import generate
    from glasslab.stages.common import load_model
    from glasslab.track.rundir import RunDir

    if num_beams < 1 or (num_beams > 1 and n > num_beams):
        raise GlasslabError(f"--n {n} with --num-beams {num_beams}: beam search gives at most --num-beams answers")
    model, tok, _ = load_model(RunDir.open(run_dir))
    ids = [tok.bos_id, *tok.encode(prompt)]
    if num_beams > 1:
        beams = beam_search(model, ids, max_new_tokens, num_beams=num_beams, stop_ids=(tok.end_id,), n=n)
        tokens = [b.tokens for b in beams]
    else:
        out = generate(
            model,
            [ids] * n,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_ids=(tok.end_id,),
            pad_id=tok.pad_id,
            seed=seed,
        )
        tokens = out.tokens
    texts = [prompt + tok.decode(t, skip_special=True) for t in tokens]
    if json_:
        emit_json({"run": str(run_dir), "prompt": prompt, "seed": seed, "samples": texts})
        return
    for i, text in enumerate(texts):
        if n > 1:
            console.rule(f"sample {i + 1}")
        print(text)
