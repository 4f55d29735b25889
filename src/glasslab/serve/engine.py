"""Continuous batching: one scheduler thread owns a model and a decode batch that requests join and leave.

`generate` runs a fixed batch from prefill to the last row's end. A server cannot wait for that: a request
that arrives while others decode is prefilled on its own, its keys and values are placed in the running batch's
KV cache, and from the next step on it decodes with the others. Rows that finish, or whose client went away,
leave at once, so their slot serves the next request.

The batch's cache is `generate`'s: every row ends at the same cache column (left padding before each prompt),
each row has its own positions and key mask, and the building blocks (`KVCache`, `PromptBatch`,
`filter_logits`, the CDF inversion of `sample`, the tool `Interceptor`) are the ones `generate` uses. Each row
draws from its own seeded generator, so a seeded request gets the same tokens whoever shares its batch.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from glasslab.model.generate import Interceptor, PromptBatch, filter_logits, sample_at
from glasslab.model.gpt import GPT, KVCache


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    @property
    def key(self) -> tuple:
        """Rows with the same key are filtered together in one batched call."""
        return (self.temperature, self.top_k, self.top_p)


@dataclass(frozen=True)
class Step:
    """What a job hears after each decode step: its new token, and why it ended if it did.
    finish is "stop" (a stop token), "length" (max_tokens) or "error" (then `token` is None and `error` says why)."""

    token: int | None
    finish: str | None = None
    error: str | None = None


@dataclass(eq=False)
class Job:
    """One completion being generated. `emit` is called on the scheduler thread; `cancel` may be called from any."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Step], None]
    interceptor: Interceptor | None = None
    stop_ids: tuple[int, ...] = ()
    tokens: list[int] = field(default_factory=list)
    forced: list[int] = field(default_factory=list)
    cancelled: bool = False
    gen: torch.Generator | None = None

    def cancel(self) -> None:
        """The client went away or a stop string was seen: the row leaves the batch before the next step."""
        self.cancelled = True


class Busy(Exception):
    """The engine's queue is full."""


class Engine:
    """The scheduler: `submit` queues jobs; the thread admits them between decode steps, up to `max_batch` rows.
    `max_batch=1` turns batching off (one request at a time), the baseline of bench/serve_load.py."""

    def __init__(self, model: GPT, *, pad_id: int, max_batch: int = 32, max_queue: int = 256) -> None:
        self.model, self.pad_id, self.max_batch, self.max_queue = model, pad_id, max_batch, max_queue
        self.device = next(model.parameters()).device
        model.eval()
        self.block = model.cfg.block_size
        self._pending: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self.rows: list[Job] = []  # the decode batch, in cache row order
        self._cache: KVCache | None = None
        self._keys = torch.zeros(0, 0, dtype=torch.bool)  # (rows, capacity): which cache columns a row attends
        self._next_pos = torch.zeros(0, dtype=torch.long)
        self._logits: Tensor | None = None  # (rows, V): each row's next-token logits
        self._thread = threading.Thread(target=self._loop, name="glasslab-engine", daemon=True)
        self._thread.start()

    # The other threads' side

    def submit(self, jobs: list[Job]) -> None:
        with self._wake:
            if self._closed:
                raise Busy("the model was unloaded")
            if len(self._pending) + len(self.rows) + len(jobs) > self.max_queue:
                raise Busy(f"{len(self._pending) + len(self.rows)} completions queued or running")
            for job in jobs:
                if not job.prompt or len(job.prompt) + job.sampling.max_tokens > self.block:
                    raise ValueError(
                        f"a prompt of {len(job.prompt)} tokens and {job.sampling.max_tokens} more exceed the context"
                    )
                job.gen = torch.Generator(device=self.device)
                job.gen.manual_seed(job.sampling.seed if job.sampling.seed is not None else torch.seed())
            self._pending.extend(jobs)
            self._wake.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(rows decoding, jobs waiting)."""
        return len(self.rows), len(self._pending)

    @property
    def idle(self) -> bool:
        return not self.rows and not self._pending

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # The scheduler thread

    def _loop(self) -> None:
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._pending and not self.rows:
                    self._wake.wait()
                if self._closed:
                    for job in [*self.rows, *self._pending]:
                        _tell(job, Step(None, "error", "the server is shutting down"))
                    return
                # Jobs stay in the queue until they are rows, so a job being prefilled is always counted.
                taken = list(itertools.islice(self._pending, self.max_batch - len(self.rows)))
            try:
                self._step(taken)
            except Exception as e:  # a failed step fails its rows, never the server
                for job in dict.fromkeys([*self.rows, *taken]):
                    _tell(job, Step(None, "error", f"generation failed: {type(e).__name__}: {e}"))
                self._reset()
                self._dequeue(taken)

    def _dequeue(self, taken: list[Job]) -> None:
        with self._wake:
            while self._pending and self._pending[0] in taken:
                self._pending.popleft()

    def _step(self, taken: list[Job]) -> None:
        self._drop([j for j, job in enumerate(self.rows) if job.cancelled])
        admitted = [j for j in taken if not j.cancelled]
        if admitted:
            self._admit(admitted)
        self._dequeue(taken)
        if not self.rows:
            return
        choice = self._choose()
        finished = []
        for j, job in enumerate(self.rows):
            if job.forced:
                choice[j] = job.forced.pop(0)
                sampled = False
            else:
                sampled = True
            job.tokens.append(choice[j])
            finish = None
            if sampled and job.interceptor is not None:
                job.forced = list(job.interceptor(0, job.tokens) or [])
            if sampled and not job.forced and choice[j] in job.stop_ids:
                finish = "stop"
            elif len(job.tokens) >= job.sampling.max_tokens:
                finish = "length"
            _tell(job, Step(choice[j], finish))
            if finish or job.cancelled:
                finished.append(j)
        keep = self._drop(finished)
        if self.rows:
            self._decode([choice[j] for j in keep])

    def _choose(self) -> list[int]:
        """Each row's next token: greedy rows by argmax, the others grouped by their sampling settings, filtered
        as `generate` filters, and drawn by inverting the CDF at a uniform from the row's own generator."""
        assert self._logits is not None
        logits = self._logits
        choice = torch.zeros(len(self.rows), dtype=torch.long, device=self.device)
        groups: dict[tuple, list[int]] = {}
        for j, job in enumerate(self.rows):  # rows about to be forced draw too: their seeded stream stays generate's
            groups.setdefault(job.sampling.key, []).append(j)
        for (temperature, top_k, top_p), rows in groups.items():
            idx = torch.tensor(rows, device=self.device)
            if temperature == 0:
                choice[idx] = logits[idx].argmax(-1)
                continue
            probs = filter_logits(logits[idx], temperature, top_k, top_p).softmax(-1)
            u = torch.cat(
                [torch.rand(1, 1, generator=self.rows[j].gen, dtype=torch.float64, device=self.device) for j in rows]
            )
            choice[idx] = sample_at(probs, u)
        return choice.tolist()

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the new prompts together (a prompt that several jobs share, as with `n` > 1, once), then put
        their keys and values in the batch's cache so that every prompt ends at the batch's current column."""
        pb = PromptBatch.of([job.prompt for job in jobs], self.pad_id, self.device)
        width = pb.idx.size(1)
        cache = KVCache(self.model, pb.idx.size(0), width)
        logits = self.model(pb.idx, positions=pb.positions, mask=pb.mask, cache=cache)[pb.rows, -1]
        cache.select(pb.rows)
        if self._cache is None:
            # Every row spans at most `block` columns (submit checks it) and the columns no row attends are
            # reclaimed once they reach block // 4, so this many columns always hold the batch.
            capacity = self.block + self.block // 4 + 1
            self._cache = KVCache(self.model, 0, capacity)
            self._keys = torch.zeros(0, capacity, dtype=torch.bool, device=self.device)
        if width > self._cache.length:
            self._shift(width - self._cache.length)
        length, capacity = self._cache.length, self._keys.size(1)
        k = cache.k.new_zeros(*cache.k.shape[:3], capacity, cache.k.size(-1))
        v = torch.zeros_like(k)
        k[..., length - width : length, :], v[..., length - width : length, :] = cache.k, cache.v
        keys = torch.zeros(len(jobs), capacity, dtype=torch.bool, device=self.device)
        keys[:, length - width : length] = pb.valid[pb.rows]
        self._cache.k, self._cache.v = torch.cat([self._cache.k, k], 1), torch.cat([self._cache.v, v], 1)
        self._keys = torch.cat([self._keys, keys])
        self._next_pos = torch.cat([self._next_pos, pb.positions[pb.rows, -1] + 1])
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])
        self.rows += jobs

    def _shift(self, by: int) -> None:
        """Move every row's cached columns `by` to the right (left: negative), so a longer prompt fits before the
        current column, or the columns no row attends any more are reclaimed."""
        assert self._cache is not None
        length, capacity = self._cache.length, self._keys.size(1)
        lo = max(0, -by)
        for name in ("k", "v"):
            old = getattr(self._cache, name)
            new = torch.zeros_like(old)
            new[..., lo + by : length + by, :] = old[..., lo:length, :]
            setattr(self._cache, name, new)
        keys = torch.zeros_like(self._keys)
        keys[:, lo + by : length + by] = self._keys[:, lo:length]
        self._keys = keys
        self._cache.length = length + by
        assert self._cache.length < capacity

    def _decode(self, tokens: list[int]) -> None:
        """One step for every row: the token each row just produced goes through the model."""
        assert self._cache is not None
        attended = self._keys[:, : self._cache.length].any(0).nonzero()
        unused = int(attended[0]) if len(attended) else self._cache.length  # leading columns no row attends
        if self._cache.length + 1 > self._keys.size(1) or unused >= self.block // 4:
            self._shift(-unused)  # every step attends over all columns: keep them to what the rows need
        col = self._cache.length
        self._keys[:, col] = True
        token = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        mask = self._keys[:, None, None, : col + 1]
        self._logits = self.model(token, positions=self._next_pos[:, None], mask=mask, cache=self._cache)[:, -1]
        self._next_pos = self._next_pos + 1

    def _drop(self, rows: list[int]) -> list[int]:
        """Remove these rows from the batch; returns the indices (before removal) of the rows kept."""
        keep = [j for j in range(len(self.rows)) if j not in set(rows)]
        if not rows:
            return keep
        if not keep:
            self._reset()
            return keep
        assert self._cache is not None and self._logits is not None
        kept = torch.tensor(keep, device=self.device)
        self._cache.select(kept)
        self._keys, self._next_pos, self._logits = self._keys[kept], self._next_pos[kept], self._logits[kept]
        self.rows = [self.rows[j] for j in keep]
        return keep

    def _reset(self) -> None:
        """An empty batch starts again from column 0."""
        self.rows, self._cache, self._logits = [], None, None
        self._keys = torch.zeros(0, 0, dtype=torch.bool)
        self._next_pos = torch.zeros(0, dtype=torch.long, device=self.device)


def _tell(job: Job, step: Step) -> None:
    """Deliver a step; a listener that is gone (its event loop closed) cancels the job instead of the engine."""
    try:
        job.emit(step)
    except RuntimeError:
        job.cancel()
