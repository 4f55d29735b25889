"""Terminal output: one rich console on stderr for people, stdout kept clean for `--json`."""

from __future__ import annotations

import json
import os
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Under torchrun every rank runs the whole command: only rank 0 reports (progress, notices, results, --json),
# while errors show from any rank, since one rank alone may hit them.
MAIN_RANK = int(os.environ.get("RANK", "0")) == 0
console = Console(stderr=True, quiet=not MAIN_RANK)
errors = Console(stderr=True)


def progress() -> Progress:
    """Step bar with loss, tokens/s, model FLOPs utilisation and ETA; one instance can carry every stage of a pipeline."""
    return Progress(
        TextColumn("[bold]{task.description:<8}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:>7.0f} tok/s"),
        TextColumn("MFU {task.fields[mfu]:>5.1%}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def emit_json(obj: Any) -> None:
    if MAIN_RANK:
        print(json.dumps(obj, indent=2, default=str))
