"""A completion request's side of generation: the engine's steps in, OpenAI's response or event stream out.

The engine thread posts each row's step to a `Mailbox`, which wakes the event loop once for however many
steps arrived since it last ran (a decode step of 16 rows is one wake-up, not 16). Each request then takes all
its waiting steps at once, and a streaming response writes them as one network write of several events: the
server keeps up with a decode batch instead of paying per-token overheads once per row.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from glasslab.serve.engine import Job, Step
from glasslab.serve.errors import ApiError
from glasslab.serve.text import StopStrings, ToolCall


class Mailbox:
    """Steps from the engine threads to one event loop, with at most one wake-up of the loop pending."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.items, self.lock, self.scheduled = loop, deque(), threading.Lock(), False

    def post(self, queue: asyncio.Queue, index: int, step: Step) -> None:
        """Called on an engine thread: choice `index` of the request listening on `queue` made a step."""
        with self.lock:
            self.items.append((queue, (index, step)))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, deque(), False
        for queue, item in items:
            queue.put_nowait(item)


@dataclass
class Piece:
    index: int
    text: str
    calls: list[ToolCall]
    finish: str | None


class Choices:
    """The choices of one request (n of them) as they grow: new text and tool calls, then each one's finish
    reason, and how many completion tokens each took up to where it ended."""

    def __init__(self, jobs: list[Job], queue: asyncio.Queue, decoders: list, stops: list[str]) -> None:
        self.jobs, self.queue, self.decoders = jobs, queue, decoders
        self.stoppers = [StopStrings(stops) for _ in jobs]
        self.counts = [0] * len(jobs)

    def usage(self, prompt_tokens: int) -> dict[str, int]:
        completion = sum(self.counts)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    async def pieces(self) -> AsyncIterator[list[Piece]]:
        """Every step waiting, as pieces; then waits for the next."""
        open_ = set(range(len(self.jobs)))
        while open_:
            steps = [await self.queue.get()]
            while not self.queue.empty():
                steps.append(self.queue.get_nowait())
            out = []
            for index, step in steps:
                if index not in open_:
                    continue  # a choice already ended by a stop string: tokens decoded meanwhile are not part of it
                piece = self._piece(index, step)
                if piece.finish:
                    open_.discard(index)
                if piece.text or piece.calls or piece.finish:
                    out.append(piece)
            if out:
                yield out

    def _piece(self, index: int, step: Step) -> Piece:
        if step.error:
            raise ApiError(500, step.error, "server_error")
        done = step.finish is not None
        self.counts[index] += 1
        text, calls = self.decoders[index].feed([step.token], final=done)
        text, hit = self.stoppers[index].feed(text, final=done)
        if hit:
            self.jobs[index].cancel()
        return Piece(index, text, calls, "stop" if hit else step.finish)


def _calls(calls: list[ToolCall]) -> list[dict[str, str]]:
    return [{"expression": c.expression, "result": c.result} for c in calls]


async def whole(choices: Choices, head: dict, chat: bool, usage: Callable[[], dict]) -> dict:
    """The non-streaming response."""
    text: dict[int, list[str]] = {}
    calls: dict[int, list[ToolCall]] = {}
    finish: dict[int, str | None] = {}
    async for pieces in choices.pieces():
        for p in pieces:
            text.setdefault(p.index, []).append(p.text)
            calls.setdefault(p.index, []).extend(p.calls)
            finish[p.index] = p.finish or finish.get(p.index)
    out = []
    for i in sorted(text):
        if chat:
            message = {"role": "assistant", "content": "".join(text[i]), "calculator_calls": _calls(calls[i])}
            out.append({"index": i, "message": message, "finish_reason": finish[i], "logprobs": None})
        else:
            out.append({"index": i, "text": "".join(text[i]), "finish_reason": finish[i], "logprobs": None})
    kind = "chat.completion" if chat else "text_completion"
    return {**head, "object": kind, "choices": out, "usage": usage()}


async def chunks(
    choices: Choices, head: dict, chat: bool, usage: Callable[[], dict] | None
) -> AsyncIterator[list[dict]]:
    """OpenAI's chunks: a role delta first (chat), then text deltas (and, from glasslab, calculator calls), a
    last chunk per choice with its finish reason, and the usage when the client asked for it."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    started: set[int] = set()
    async for pieces in choices.pieces():
        out = []
        for p in pieces:
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
            out.append({**head, "object": kind, "choices": [choice]})
        yield out
    if usage is not None:
        yield [{**head, "object": kind, "choices": [], "usage": usage()}]


async def sse(stream: AsyncIterator[list[dict]], jobs: list[Job]) -> AsyncIterator[str]:
    """Server-sent events, each batch of chunks in one write; an error mid-stream becomes an error event. However
    the stream ends (finished, failed, or the client went away and the response was cancelled), its rows leave
    the decode batch."""
    try:
        async for batch in stream:
            yield "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in batch)
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        for job in jobs:
            job.cancel()
