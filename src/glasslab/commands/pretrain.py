"""`glasslab pretrain`: tokenizer and pretraining on the embedded corpus or the user's text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from glasslab.commands.common import config_from_options, finish, new_run, resume_run
from glasslab.commands.options import ConfigFile, Json, Name, Overwrite, Preset, Profile, Resume, RunsDir, Seed, Sets


def pretrain(
    preset: Preset = "tiny",
    config: ConfigFile = None,
    data: Annotated[str | None, typer.Option(help="text file, directory, .jsonl, .parquet or datasets dir")] = None,
    set_: Sets = None,
    name: Name = None,
    runs_dir: RunsDir = Path("runs"),
    seed: Seed = None,
    overwrite: Overwrite = False,
    resume: Resume = False,
    probes: Annotated[
        Literal["off", "default", "full"] | None,
        typer.Option(help="probes: off | default cadences | full (every step)"),
    ] = None,
    profile: Profile = 0,
    json_: Json = False,
) -> None:
    """Pretrain a GPT on the embedded Shakespeare corpus or your own text."""
    from glasslab.stages.pretrain import pretrain as run_pretrain
    from glasslab.ui import progress

    cfg = config_from_options(preset, config, set_, seed, profile)
    if data is not None:
        cfg.data.source = data
    if probes is not None:
        cfg.probes.mode = probes
    run, resumed = new_run(runs_dir, name, f"pretrain-{preset}", overwrite, resume)
    if resumed:
        resume_run(run, json_)
        return
    run.update_manifest(pipeline=["pretrain"], preset=preset)
    with progress() as bar:
        run_pretrain(cfg, run, progress=bar)
    run.set_status("completed")
    finish(run, json_)
