"""`glasslab ledger`: every experiment with its decision, effect and interval; how often A/A checks saw an effect."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glasslab.commands.experiment import ExperimentsDir
from glasslab.commands.options import Json
from glasslab.track import layout


def ledger(
    dir_: ExperimentsDir = Path(layout.EXPERIMENTS),
    last: Annotated[int | None, typer.Option(help="only the newest N entries")] = None,
    json_: Json = False,
) -> None:
    """List the experiments ledger, oldest first: decision, verdict, paired difference ± 95% interval, p."""
    from rich.table import Table

    from glasslab.errors import GlasslabError
    from glasslab.experiment import ledger as book
    from glasslab.ui import console, emit_json

    if last is not None and last < 1:
        raise GlasslabError(f"--last {last} must be at least 1")
    path = book.ledger_path(dir_)
    entries = book.read(path)
    shown = entries[-last:] if last else entries
    if json_:
        page = Path(dir_) / layout.LEDGER_PAGE
        emit_json(
            {
                "ledger": str(path),
                "page": str(page) if page.is_file() else None,
                "entries": shown,
                "aa": book.aa_rate(entries),
            }
        )
        return
    table = Table("id", "decision", "verdict", "metric", "difference ± 95%", "p", "what", title=str(path))
    for e in shown:
        diff = f"{e['difference']:+.4g} ± {e['ci95']:.2g}" if e.get("ci95") is not None else "-"
        p = f"{e['p']:.3g}" if e.get("p") is not None else "-"
        table.add_row(
            e["id"], e["decision"], str(e.get("verdict") or "-"), e["metric"], diff, p, e.get("description", "")
        )
    console.print(table)
    aa = book.aa_rate(entries)
    if aa["checks"]:
        console.print(f"A/A checks: {aa['false_effects']} of {aa['checks']} called noise an effect", highlight=False)
    if (Path(dir_) / layout.LEDGER_PAGE).is_file():
        console.print(f"page: {Path(dir_) / layout.LEDGER_PAGE}", highlight=False)
