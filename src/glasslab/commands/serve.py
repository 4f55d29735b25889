"""`glasslab serve`: an OpenAI-compatible server and a live page for a run, or for every run of a directory."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated

import typer

from glasslab.errors import GlasslabError
from glasslab.ui import console, errors

API_KEY_ENV = "GLASSLAB_API_KEY"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port or an unknown host is one clear line."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        reason = getattr(e, "strerror", None) or e
        raise GlasslabError(f"cannot listen on {host}:{port} ({reason}): pick another --port or --host") from None
    return sock


def serve(
    path: Annotated[Path, typer.Argument(help="a run (runs/my-run) or a directory of runs (runs/)")],
    stage: Annotated[
        str | None, typer.Option(help="serve this stage's newest checkpoint (default: the newest)")
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on; anything but loopback exposes the server")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    api_key: Annotated[
        str | None, typer.Option(help=f"require 'Authorization: Bearer KEY' (or set {API_KEY_ENV})")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="rows decoded together; 1 turns batching off")] = 32,
    max_loaded: Annotated[int, typer.Option(help="models kept in memory when serving a directory")] = 2,
    max_concurrent: Annotated[int, typer.Option(help="completions queued or generating per model; more get 429")] = 64,
    max_n: Annotated[int, typer.Option(help="most completions one request may ask for (n)")] = 8,
) -> None:
    """Serve a run's model over OpenAI's API (chat and completions, streamed or not), with a chat page and a live
    view of the runs directory at http://HOST:PORT/."""
    try:
        import uvicorn

        from glasslab.serve.app import Limits, create_app
    except ImportError:
        raise GlasslabError("glasslab serve needs FastAPI and uvicorn: pip install 'glasslab[serve]'") from None
    from glasslab.serve.models import ModelPool, servable_runs

    bounds = (
        ("max-batch", max_batch),
        ("max-loaded", max_loaded),
        ("max-concurrent", max_concurrent),
        ("max-n", max_n),
    )
    for name, value in bounds:
        if value < 1:
            raise GlasslabError(f"--{name} must be at least 1, got {value}")
    runs, runs_dir = servable_runs(path, stage)
    sock = _listen(host, port)
    pool = ModelPool(runs, stage=stage, max_loaded=max_loaded, max_batch=max_batch, max_queue=max_concurrent)
    if len(runs) == 1:
        pool.get(next(iter(runs)))  # a single run loads now, so a missing checkpoint is said here, not per request
    key = api_key or os.environ.get(API_KEY_ENV) or None
    app = create_app(pool, runs_dir, limits=Limits(max_n=max_n), api_key=key)
    if not _loopback(host):
        errors.print(
            f"[bold red]WARNING: listening on {host}, not loopback: anyone who can reach this machine can use the "
            f"server{'' if key else ' (no --api-key set)'}[/]",
            highlight=False,
        )
    console.print(
        f"serving {', '.join(runs)} at [bold]http://{host}:{port}/[/] (OpenAI API under /v1); Ctrl-C stops",
        highlight=False,
    )
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        pool.close()
        sock.close()
