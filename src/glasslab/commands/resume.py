"""`glasslab resume`: continue a stopped or killed run where it stopped."""

from __future__ import annotations

from glasslab.commands.common import resume_run
from glasslab.commands.options import Json, RunArg


def resume(run_dir: RunArg, json_: Json = False) -> None:
    """Continue a stopped or killed run from its last checkpoint."""
    from glasslab.track.rundir import RunDir

    resume_run(RunDir.open(run_dir), json_)
