"""The HTTP side: OpenAI-compatible endpoints, the page, and the runs directory's live data, in one FastAPI app.

Generation happens on each model's engine thread; a request turns into jobs, one per choice, and the engine's
steps come back through the request's asyncio queue (stream.py). Every mistake a client can make is answered with a 4xx and an OpenAI-style error body
(`{"error": {"message", "type", ...}}`), and never reaches the engine: the body is bounded before it is read,
parsed and validated before a model is touched, and its prompt and budget checked against the model's context.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from glasslab.chat.format import Message, render_prompt
from glasslab.chat.tools import ToolInterceptor
from glasslab.errors import GlasslabError
from glasslab.model.beam import beam_search
from glasslab.serve.engine import Busy, Job, Sampling, Step
from glasslab.serve.errors import ApiError
from glasslab.serve.live import run_detail, runs_overview
from glasslab.serve.models import AllBusy, Loaded, ModelPool
from glasslab.serve.schemas import MAX_STOP, ChatRequest, CompletionRequest, Sampled
from glasslab.serve.stream import Choices, Mailbox, chunks, sse, whole
from glasslab.serve.text import ChatText, PlainText

_PAGE = resources.files("glasslab.serve") / "page"
_VENDOR = resources.files("glasslab.report") / "vendor"
ASSETS = {  # the only static files served: a fixed list, so no request path ever reaches the file system
    "app.js": (_PAGE / "app.js", "text/javascript"),
    "app.css": (_PAGE / "app.css", "text/css"),
    "uPlot.iife.min.js": (_VENDOR / "uPlot.iife.min.js", "text/javascript"),
    "uPlot.min.css": (_VENDOR / "uPlot.min.css", "text/css"),
}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_n: int = 8
    max_concurrent: int = 64  # completions queued or generating, per model; more get 429
    max_tokens: int | None = None  # per completion; None = the model's context
    max_beams: int = 8


class BodyLimit:
    """ASGI middleware: a request body past `limit` bytes is refused (413) before the app reads it, whether its
    Content-Length says so or it streams in chunks."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body larger than {self.limit} bytes: send a shorter prompt"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            e = ApiError(413, message)
            return await JSONResponse(e.body(), status_code=413)(scope, receive, send)
        seen = 0

        async def bounded() -> dict:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, message)
            return event

        return await self.app(scope, bounded, send)


def create_app(pool: ModelPool, runs_dir: Path, *, limits: Limits = Limits(), api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="glasslab", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    beam_lock = asyncio.Lock()
    mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    async def check_key(request: Request) -> None:
        """The API key, when the server has one, compared in constant time."""
        if api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                raise ApiError(
                    401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "authentication_error"
                )

    guard = [Depends(check_key)]

    # OpenAI endpoints

    @app.get("/v1/models", dependencies=guard)
    async def models() -> Response:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "glasslab"} for name in pool.runs]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/chat/completions", dependencies=guard)
    async def chat_completions(request: Request) -> Response:
        req = await _parse(request, ChatRequest)
        model = await _model(req)
        prompt = render_prompt([_message(m.role, m.text) for m in req.messages], model.tok)
        return await _complete(req, model, prompt, req.max_completion_tokens or req.max_tokens, chat=True)

    @app.post("/v1/completions", dependencies=guard)
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        model = await _model(req)
        prompt = [model.tok.bos_id, *model.tok.encode(req.prompt)]
        return await _complete(req, model, prompt, req.max_tokens, chat=False)

    @app.get("/health")
    async def health() -> Response:
        loaded = {m.name: dict(zip(("decoding", "waiting"), m.engine.load)) for m in list(pool.loaded.values())}
        return JSONResponse({"status": "ok", "models": list(pool.runs), "loaded": loaded})

    async def _model(req: Sampled) -> Loaded:
        """The request's model, once what can be checked without it has been."""
        if req.n > limits.max_n:
            raise ApiError(400, f"n is at most {limits.max_n}", param="n")
        if len(req.stops) > MAX_STOP:
            raise ApiError(400, f"at most {MAX_STOP} stop strings", param="stop")
        if req.num_beams > limits.max_beams:
            raise ApiError(400, f"num_beams is at most {limits.max_beams}", param="num_beams")
        name = req.model
        if name not in pool.runs:
            raise ApiError(404, f"unknown model '{name}': GET /v1/models lists the ones served", param="model")
        try:
            return await asyncio.to_thread(pool.get, name)
        except AllBusy as e:
            raise ApiError(503, f"{e}: retry shortly", "server_error") from None
        except GlasslabError as e:
            raise ApiError(503, f"model '{name}' cannot be loaded: {e}", "server_error") from None

    async def _complete(req: Sampled, model: Loaded, prompt: list[int], max_tokens: int | None, chat: bool) -> Response:
        block = model.block_size
        cap = limits.max_tokens or block
        if max_tokens is not None and max_tokens > cap:
            raise ApiError(400, f"max_tokens {max_tokens} is more than {cap}: ask for fewer", param="max_tokens")
        if len(prompt) >= block:
            raise ApiError(
                400,
                f"the prompt has {len(prompt)} tokens and the model's context {block}: shorten it",
                param="messages",
            )
        budget = min(max_tokens or block, block - len(prompt))
        if req.num_beams > 1:
            return await _beams(req, model, prompt, budget, chat)
        tok, queue, loop = model.tok, asyncio.Queue(), asyncio.get_running_loop()
        mailbox = mailboxes.get(loop) or mailboxes.setdefault(loop, Mailbox(loop))
        jobs = [
            Job(
                prompt,
                Sampling(budget, req.temperature, req.top_k, req.top_p, None if req.seed is None else req.seed + i),
                emit=partial(mailbox.post, queue, i),
                interceptor=ToolInterceptor(tok) if chat else None,
                stop_ids=(tok.end_id,),
            )
            for i in range(req.n)
        ]
        try:
            model.engine.submit(jobs)
        except Busy as e:
            raise ApiError(429, f"{e}: retry shortly", "rate_limit_error") from None
        head = _head(req, chat)
        choices = Choices(jobs, queue, [(ChatText if chat else PlainText)(tok) for _ in jobs], req.stops)
        usage = partial(choices.usage, len(prompt))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                sse(chunks(choices, head, chat, usage if include_usage else None), jobs),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return JSONResponse(await whole(choices, head, chat, usage))
        finally:
            for job in jobs:
                job.cancel()

    async def _beams(req: Sampled, model: Loaded, prompt: list[int], budget: int, chat: bool) -> Response:
        """Beam search runs beside the decode batch, one search at a time; its best `n` beams are answered as
        if generated, through the same text and stop-string handling."""
        if req.n > req.num_beams:
            raise ApiError(400, f"n {req.n} is more than num_beams {req.num_beams}", param="n")
        if req.stream:
            raise ApiError(400, "beam search answers at once: send num_beams with stream false", param="stream")
        tok = model.tok
        async with beam_lock:
            beams = await asyncio.to_thread(
                beam_search,
                model.engine.model,
                prompt,
                budget,
                num_beams=req.num_beams,
                stop_ids=(tok.end_id,),
                interceptor=ToolInterceptor(tok) if chat else None,
                n=req.n,
            )
        jobs = [Job(prompt, Sampling(budget), emit=lambda step: None) for _ in beams]
        queue: asyncio.Queue = asyncio.Queue()
        for i, beam in enumerate(beams):
            for j, token in enumerate(beam.tokens):
                last = j == len(beam.tokens) - 1
                queue.put_nowait((i, Step(token, ("length" if beam.truncated else "stop") if last else None)))
        choices = Choices(jobs, queue, [(ChatText if chat else PlainText)(tok) for _ in jobs], req.stops)
        return JSONResponse(await whole(choices, _head(req, chat), chat, partial(choices.usage, len(prompt))))

    # The page and the runs directory

    @app.get("/")
    async def index() -> Response:
        return HTMLResponse((_PAGE / "index.html").read_text(encoding="utf-8"))

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in ASSETS:
            raise ApiError(404, f"no asset '{name}'", "not_found_error")
        path, media = ASSETS[name]
        return Response(path.read_text(encoding="utf-8"), media_type=media)

    @app.get("/api/runs", dependencies=guard)
    async def runs() -> Response:
        return JSONResponse(await asyncio.to_thread(runs_overview, runs_dir, set(pool.runs)))

    @app.get("/api/runs/{name}", dependencies=guard)
    async def run(name: str) -> Response:
        return JSONResponse(await asyncio.to_thread(run_detail, _run_path(name)))

    @app.get("/api/runs/{name}/report", dependencies=guard)
    async def report(name: str) -> Response:
        from glasslab.report.page import render_page
        from glasslab.report.rundata import load_run
        from glasslab.report.sections import build_sections

        data = await asyncio.to_thread(load_run, _run_path(name))
        return HTMLResponse(render_page(f"glasslab run: {name}", build_sections(data), subtitle=str(name)))

    @app.get("/files/{path:path}", dependencies=guard)
    async def files(path: str) -> Response:
        return FileResponse(_inside(runs_dir, path))

    def _run_path(name: str) -> Path:
        path = _inside(runs_dir, name)
        if path.parent != runs_dir.resolve() or not (path / "manifest.json").is_file():
            raise ApiError(404, f"no run '{name}' in {runs_dir.name}", "not_found_error")
        return path

    return app


def _head(req: Sampled, chat: bool) -> dict[str, Any]:
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": req.model,
    }


def _inside(root: Path, relative: str) -> Path:
    """The file or directory `relative` names under `root`, resolved (symbolic links and `..` followed); 404 for
    anything that ends up outside it or does not exist. Starlette has percent-decoded the path once; a name that
    still holds a `%` or a backslash was encoded twice or written for another system, and is refused as well."""
    root = root.resolve()
    if "%" in relative or "\\" in relative or "\x00" in relative:
        raise ApiError(404, f"no file '{relative}' in the runs directory", "not_found_error")
    path = (root / relative).resolve()
    if not path.is_relative_to(root) or not path.exists():
        raise ApiError(404, f"no file '{relative}' in the runs directory", "not_found_error")
    return path


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None


def _message(role: str, text: str) -> Message:
    return Message("system" if role == "developer" else role, text)
