"""The HTTP side: OpenAI-compatible endpoints, the page, and the runs directory's live data, in one FastAPI app.

Generation happens on each model's engine thread; a request turns into jobs, and the engine's steps come back
through an asyncio queue. Every mistake a client can make is answered with a 4xx and an OpenAI-style error body
(`{"error": {"message", "type", ...}}`), and never reaches the engine: the body is bounded before it is read,
parsed and validated before a model is touched, and its prompt and budget checked against the model's context.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
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
from glasslab.serve.engine import Busy, Job, Sampling, Step
from glasslab.serve.live import run_detail, runs_overview
from glasslab.serve.models import AllBusy, Loaded, ModelPool
from glasslab.serve.schemas import MAX_STOP, ChatRequest, CompletionRequest, Sampled
from glasslab.serve.text import ChatText, PlainText, StopStrings, ToolCall

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


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


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
            return await _error(413, message)(scope, receive, send)
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

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.kind, e.param)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        return _error(
            e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error"
        )

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
        model = await _model(req.model)
        prompt = render_prompt([_message(m.role, m.text) for m in req.messages], model.tok)
        return await _complete(req, model, prompt, req.max_completion_tokens or req.max_tokens, chat=True)

    @app.post("/v1/completions", dependencies=guard)
    async def completions(request: Request) -> Response:
        req = await _parse(request, CompletionRequest)
        model = await _model(req.model)
        prompt = [model.tok.bos_id, *model.tok.encode(req.prompt)]
        return await _complete(req, model, prompt, req.max_tokens, chat=False)

    @app.get("/health")
    async def health() -> Response:
        loaded = {m.name: dict(zip(("decoding", "waiting"), m.engine.load)) for m in list(pool.loaded.values())}
        return JSONResponse({"status": "ok", "models": list(pool.runs), "loaded": loaded})

    async def _model(name: str) -> Loaded:
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
        if req.n > limits.max_n:
            raise ApiError(400, f"n is at most {limits.max_n}", param="n")
        if len(req.stops) > MAX_STOP:
            raise ApiError(400, f"at most {MAX_STOP} stop strings", param="stop")
        budget = min(max_tokens or block, block - len(prompt))
        tok, loop, queue = model.tok, asyncio.get_running_loop(), asyncio.Queue()
        jobs = [
            Job(
                prompt,
                Sampling(budget, req.temperature, req.top_k, req.top_p, None if req.seed is None else req.seed + i),
                emit=partial(_post, loop, queue, i),
                interceptor=ToolInterceptor(tok) if chat else None,
                stop_ids=(tok.end_id,),
            )
            for i in range(req.n)
        ]
        try:
            model.engine.submit(jobs)
        except Busy as e:
            raise ApiError(429, f"{e}: retry shortly", "rate_limit_error") from None
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": req.model,
        }
        counts = [0] * len(jobs)
        pieces = _pieces(queue, jobs, [(ChatText if chat else PlainText)(tok) for _ in jobs], req.stops, counts)
        usage = partial(_usage, len(prompt), counts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(_stream(pieces, head, chat, usage if include_usage else None), jobs),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return JSONResponse(await _whole(pieces, head, chat, usage))
        finally:
            for job in jobs:
                job.cancel()

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


def _post(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int, step: Step) -> None:
    """Called on the engine thread: hand the step to the request's event loop."""
    loop.call_soon_threadsafe(queue.put_nowait, (index, step))


@dataclass
class Piece:
    index: int
    text: str
    calls: list[ToolCall]
    finish: str | None


async def _pieces(
    queue: asyncio.Queue, jobs: list[Job], decoders: list, stops: list[str], counts: list[int]
) -> AsyncIterator[Piece]:
    """The request's choices as they grow: new text and tool calls, then each choice's finish reason. `counts`
    keeps each choice's completion tokens, up to where it ended."""
    stoppers = [StopStrings(stops) for _ in jobs]
    open_ = set(range(len(jobs)))
    while open_:
        index, step = await queue.get()
        if index not in open_:
            continue  # a choice already ended by a stop string: tokens decoded meanwhile are not part of it
        if step.error:
            raise ApiError(500, step.error, "server_error")
        done = step.finish is not None
        counts[index] += 1
        text, calls = decoders[index].feed([step.token], final=done)
        text, hit = stoppers[index].feed(text, final=done)
        if hit:
            jobs[index].cancel()
        finish = "stop" if hit else step.finish
        if finish:
            open_.discard(index)
        if text or calls or finish:
            yield Piece(index, text, calls, finish)


def _usage(prompt_tokens: int, counts: list[int]) -> dict[str, int]:
    completion = sum(counts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _calls(calls: list[ToolCall]) -> list[dict[str, str]]:
    return [{"expression": c.expression, "result": c.result} for c in calls]


async def _whole(pieces: AsyncIterator[Piece], head: dict, chat: bool, usage: Callable[[], dict]) -> dict:
    text: dict[int, list[str]] = {}
    calls: dict[int, list[ToolCall]] = {}
    finish: dict[int, str | None] = {}
    async for p in pieces:
        text.setdefault(p.index, []).append(p.text)
        calls.setdefault(p.index, []).extend(p.calls)
        finish[p.index] = p.finish or finish.get(p.index)
    choices = []
    for i in sorted(text):
        if chat:
            message = {"role": "assistant", "content": "".join(text[i]), "calculator_calls": _calls(calls[i])}
            choices.append({"index": i, "message": message, "finish_reason": finish[i], "logprobs": None})
        else:
            choices.append({"index": i, "text": "".join(text[i]), "finish_reason": finish[i], "logprobs": None})
    kind = "chat.completion" if chat else "text_completion"
    return {**head, "object": kind, "choices": choices, "usage": usage()}


async def _stream(
    pieces: AsyncIterator[Piece], head: dict, chat: bool, usage: Callable[[], dict] | None
) -> AsyncIterator[dict]:
    """OpenAI's chunks: a role delta first (chat), then text deltas (and, from glasslab, calculator calls), a
    last chunk per choice with its finish reason, and the usage when the client asked for it."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    started: set[int] = set()
    async for p in pieces:
        if chat:
            delta: dict[str, Any] = {} if p.index in started else {"role": "assistant"}
            started.add(p.index)
            if p.text or not p.finish:
                delta["content"] = p.text
            if p.calls:
                delta["calculator_calls"] = _calls(p.calls)
            choice = {"index": p.index, "delta": delta, "finish_reason": p.finish, "logprobs": None}
        else:
            choice = {"index": p.index, "text": p.text, "finish_reason": p.finish, "logprobs": None}
        yield {**head, "object": kind, "choices": [choice]}
    if usage is not None:
        yield {**head, "object": kind, "choices": [], "usage": usage()}


async def _sse(chunks: AsyncIterator[dict], jobs: list[Job]) -> AsyncIterator[str]:
    """Server-sent events; an error mid-stream becomes an error event. However the stream ends (finished,
    failed, or the client went away and the response was cancelled), its rows leave the decode batch."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'param': None, 'code': None}})}\n\n"
    finally:
        for job in jobs:
            job.cancel()
