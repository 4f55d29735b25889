"""`glasslab mcp`: serve the lab to an AI agent over the Model Context Protocol (stdio, or HTTP on loopback)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from glasslab.commands.experiment import ExperimentsDir
from glasslab.commands.options import RunsDir
from glasslab.track import layout


def mcp(
    dir_: ExperimentsDir = Path(layout.EXPERIMENTS),
    runs_dir: RunsDir = Path("runs"),
    http: Annotated[int | None, typer.Option(help="serve streamable HTTP on 127.0.0.1:PORT instead of stdio")] = None,
) -> None:
    """Serve the lab's tools (describe, start experiments and studies, poll, cancel, ledger, runs, metrics) to an
    MCP client. Needs the `agents` extra. Exit codes: 0 the client closed the session, 2 bad input or no SDK."""
    from glasslab.errors import GlasslabError

    try:
        import mcp as _  # noqa: F401
    except ImportError:
        raise GlasslabError("glasslab mcp needs the MCP SDK: pip install 'glasslab[agents]'") from None
    if http is not None and not 0 < http < 65536:
        raise GlasslabError(f"--http {http} is not a port: give 1-65535")
    from glasslab.agents.mcp_server import serve

    serve(dir_, runs_dir, http)
