"""`glasslab sample`: text from a run's checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from glasslab.commands.options import CheckpointStage, CheckpointStep, Json, NumBeams, RunArg
from glasslab.errors import GlasslabError
from glasslab.ui import console, emit_json


def sample(
    run_dir: RunArg,
    prompt: Annotated[str, typer.Option(help="text to continue")] = "\n",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens to generate")] = 200,
    temperature: Annotated[float, typer.Option(min=0, help="0 for greedy")] = 0.8,
    top_k: Annotated[int | None, typer.Option(min=1, help="keep the k most likely tokens")] = None,
    top_p: Annotated[float | None, typer.Option(help="nucleus sampling mass, in (0, 1]")] = 0.95,
    n: Annotated[int, typer.Option(min=1, help="number of samples")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="sampling seed")] = 0,
    stage: CheckpointStage = None,
    step: CheckpointStep = None,
    num_beams: NumBeams = 1,
    json_: Json = False,
) -> None:
    """Generate text from a run's checkpoint (the newest, or --stage/--step); with --num-beams, the n best beams."""
    from glasslab.commands.options import check_top_p
    from glasslab.model.beam import beam_search
    from glasslab.model.generate import generate
    from glasslab.stages.common import checkpoint_info, choose_checkpoint, load_model
    from glasslab.track.rundir import RunDir

    check_top_p(top_p)
    if num_beams < 1 or (num_beams > 1 and n > num_beams):
        raise GlasslabError(f"--n {n} with --num-beams {num_beams}: beam search gives at most --num-beams answers")
    run = RunDir.open(run_dir)
    checkpoint = choose_checkpoint(run, stage, step)
    model, tok, _ = load_model(run, checkpoint=checkpoint)
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
        emit_json(
            {"run": str(run_dir), **checkpoint_info(checkpoint), "prompt": prompt, "seed": seed, "samples": texts}
        )
        return
    for i, text in enumerate(texts):
        if n > 1:
            console.rule(f"sample {i + 1}")
        print(text)
