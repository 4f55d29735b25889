"""`glasslab sft`: fine-tune a run into a chat model on task environments' conversations or the user's file."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from glasslab.commands.options import StageOptions, stage_command
from glasslab.errors import GlasslabError
from glasslab.ui import console, emit_json

if TYPE_CHECKING:
    from glasslab.config import Config


@stage_command
def sft(
    base: Annotated[Path, typer.Argument(help="the run to fine-tune (its newest checkpoint), e.g. runs/base")],
    tasks: Annotated[str | None, typer.Option(help="task environments, comma-separated: arithmetic,countdown")] = None,
    data: Annotated[Path | None, typer.Option(help="a JSONL file of conversations (alone unless --tasks too)")] = None,
    show_example: Annotated[
        bool, typer.Option(help="print rendered examples, trained tokens highlighted, and exit")
    ] = False,
    *,
    opts: StageOptions,
) -> None:
    """Fine-tune a pretrained run on chat conversations from task environments or your own file."""
    import shutil

    from glasslab.commands.common import (
        config_from_options,
        finish,
        new_run,
        removed_if_untrained,
        resume_run,
        resuming,
        run_path,
    )
    from glasslab.config import build_config
    from glasslab.stages.common import load_run_config
    from glasslab.stages.inputs import check_inputs
    from glasslab.stages.sft import sft as run_sft
    from glasslab.track.checkpoint import latest_checkpoint
    from glasslab.track.rundir import RunDir
    from glasslab.ui import progress

    base_run = RunDir.open(base)
    init = latest_checkpoint(base_run.checkpoints_dir)
    if init is None or not base_run.tokenizer_path.exists():
        raise GlasslabError(f"run {base_run.path} has no checkpoint (or tokenizer) to fine-tune: train it first")
    cfg = config_from_options(opts.preset, opts.config, opts.sets, opts.seed, opts.profile)
    base_cfg = load_run_config(base_run)
    tree = cfg.model_dump()
    tree["model"], tree["tokenizer"] = base_cfg.model.model_dump(), base_cfg.tokenizer.model_dump()
    if tasks is not None or data is not None:  # the command line's data replaces the config's
        tree["sft"].update(
            tasks=[t.strip() for t in (tasks or "").split(",") if t.strip()], data=str(data) if data else None
        )
    cfg = build_config(tree)
    if show_example:
        _show_examples(cfg, base_run.tokenizer_path, opts.json)
        return
    path = run_path(opts.runs_dir, opts.name, f"sft-{base_run.name}")
    if existing := resuming(path, opts.resume):
        resume_run(existing, opts.json)
        return
    check_inputs(cfg, ["sft"], tokenizer=base_run.tokenizer_path)
    run = new_run(path, opts.overwrite)
    shutil.copyfile(base_run.tokenizer_path, run.tokenizer_path)
    run.update_manifest(
        pipeline=["sft"], preset=opts.preset, init=str(init.resolve()), parent=str(base_run.path.resolve())
    )
    with removed_if_untrained(run), progress() as bar:
        run_sft(cfg, run, init=init, progress=bar)
    run.set_status("completed")
    finish(run, opts.json)


def _show_examples(cfg: Config, tokenizer_path: Path, as_json: bool) -> None:
    """One rendered conversation per task (and from the data file): trained tokens bold green, given ones dim."""
    from rich.text import Text

    from glasslab.data.tokenizer import load_tokenizer
    from glasslab.envs import get_env
    from glasslab.objectives.sft import env_conversations, to_example
    from glasslab.stages.sft import file_data

    tok = load_tokenizer(tokenizer_path, cfg.tokenizer)
    envs = [get_env(task, cfg.envs.get(task, {})) for task in cfg.sft.tasks]
    examples = [to_example(env_conversations(env, "train", 1, cfg.seed)[0], tok) for env in envs]
    examples += file_data(cfg, tok)[0][:1]
    if as_json:
        emit_json([{"tokens": [tok.decode([i]) for i in e.ids], "trained": e.trained} for e in examples])
        return
    for e in examples:
        text = Text()
        for i, trained in zip(e.ids, e.trained):
            text.append(tok.decode([i]), style="bold green" if trained else "dim")
        console.print(text)
    console.print(
        f"[bold green]trained[/] / [dim]given[/]: the loss covers assistant tokens only ({len(examples)} example(s))"
    )
