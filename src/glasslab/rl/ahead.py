"""Generating ahead (rl.generate_ahead): the next rollout batch is sampled in a background process while the
current one trains, so generation and training share the machine instead of taking turns.

Sampling runs on a copy of the policy in shared memory, refreshed from it before each batch starts. Batch k+1
therefore comes from the weights that train on batch k: the policy trained on a batch is one optimizer step newer
than the one that sampled it, and the objective's importance ratio against the sampling policy (π_old) corrects
for that. The process also scores its batch under a copy of the frozen reference policy when the trainer is still
busy with the batch before as sampling ends; otherwise the trainer, already waiting, scores it itself after
receiving it. Either way it is one computation on the same inputs with as many threads, so the values are the same
and the run does not depend on which process did it: the reference's forward goes where there is slack (with
short answers the trainer tends to be free first, with longer ones the sampling process; docs/RESULTS.md,
"Where the reference is scored"). A reference reset
(rl.ref_reset_every) refreshes that copy at the next batch, and drops what the batch in flight was scored under
the old one. The copies carry no probe hooks, and each batch is fixed by its index, so a run is deterministic at
a seed.

A process rather than a thread: both halves of an RL step are thousands of small PyTorch ops, and each op takes
Python's GIL to launch. In one process the two threads queue for it at every op, and the training half slows
down beside a sampling thread far more than beside a sampling process (docs/BENCHMARKS.md).
PyTorch's intra-op thread count is one per process: while generating ahead it is halved, so the two processes
together use the cores one used before (more would oversubscribe them), and `close` restores it.
"""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Generic, TypeVar

import torch
import torch.multiprocessing as mp

from glasslab.model.gpt import GPT

T = TypeVar("T")


class Ahead(Generic[T]):
    """One background worker process, the copies of the policy and the reference it works with, and
    `sample(policy_copy, reference_copy, index, trainer_waiting)`, the job it runs (picklable: it is sent to the
    worker once, when the worker starts); `trainer_waiting()` tells the job whether the trainer waits for it yet."""

    def __init__(self, policy: GPT, reference: GPT, sample: Callable[[GPT, GPT, int, Callable[[], bool]], T]) -> None:
        self.copy, self.reference = _shared_copy(policy), _copy_weights(_shared_copy(reference), reference)
        self._waiting = torch.zeros(1, dtype=torch.bool).share_memory_()
        self.device_type = next(policy.parameters()).device.type
        self._threads = torch.get_num_threads()
        half = max(1, self._threads // 2)
        torch.set_num_threads(half)
        self._pool = ProcessPoolExecutor(
            1,
            mp_context=mp.get_context("spawn"),
            initializer=_start_worker,
            initargs=(self.copy, self.reference, self._waiting, sample, half),
        )
        self._future: Future[T] | None = None

    def refresh(self, policy: GPT, reference: GPT | None = None) -> GPT:
        """Copy the policy's current weights into the sampling copy, and the reference's if it is given (it
        changes only at a reference reset); nothing may be running on them. Returns the policy copy."""
        assert self._future is None, "refresh while a batch is being sampled"
        if reference is not None:
            _copy_weights(self.reference, reference)
        return _copy_weights(self.copy, policy)

    def start(self, index: int) -> None:
        """Sample batch `index` in the background, under the caller's autocast."""
        autocast = (
            self.device_type,
            torch.get_autocast_dtype(self.device_type),
            torch.is_autocast_enabled(self.device_type),
        )
        self._waiting.fill_(False)
        self._future = self._pool.submit(_job, index, autocast)

    def wait(self) -> T | None:
        """The batch being sampled, once it is done (None if none was started); errors in the worker re-raise here."""
        future, self._future = self._future, None
        self._waiting.fill_(True)
        return future.result() if future is not None else None

    def close(self) -> None:
        """Finish the batch in flight, stop the worker, and give the process its intra-op threads back."""
        self._pool.shutdown(wait=True)
        torch.set_num_threads(self._threads)


def _shared_copy(model: GPT) -> GPT:
    """An inference copy of the model's architecture in shared memory. Its random init is overwritten before use,
    and must not move the trainer's random stream (dropout): a run resumed from a checkpoint makes the copy at
    another step than the run it continues."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return GPT(model.cfg).to(device).eval().requires_grad_(False).share_memory()


@torch.no_grad()
def _copy_weights(copy: GPT, model: GPT) -> GPT:
    for mine, theirs in zip(copy.parameters(), model.parameters(), strict=True):
        mine.copy_(theirs)
    return copy


_worker: tuple[GPT, GPT, torch.Tensor, Callable] | None = None  # in the worker: the shared copies, flag and job


def _start_worker(copy: GPT, reference: GPT, waiting: torch.Tensor, sample: Callable, threads: int) -> None:
    global _worker
    # Ctrl-C reaches the whole process group; the trainer's process handles it (it finishes the step, checkpoints
    # with the batch in flight, and stops), so the worker must not die of it mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    _keep_freed_memory()
    _worker = copy, reference, waiting, sample


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's <malloc.h>


def _keep_freed_memory() -> None:
    """Make glibc's malloc serve large blocks from its heap and keep what is freed, instead of mapping fresh pages
    for every large tensor and handing them back after. A decode step allocates and frees several MB (logits,
    probabilities, cache copies), and by default each such block is page-faulted in anew, in the main arena of this
    process even more than in a thread's arena, which makes sampling measurably slower (docs/BENCHMARKS.md). Only
    this process's allocator changes; elsewhere than glibc there is no mallopt, and nothing."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: blocks under 32 MiB come from the heap
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)  # give the heap's free top back to the system only past 1 GiB
    mallopt(_M_TOP_PAD, 64 << 20)  # and grow it 64 MiB at a time


def _job(index: int, autocast: tuple[str, torch.dtype, bool]) -> object:
    assert _worker is not None
    copy, reference, waiting, sample = _worker
    device_type, dtype, enabled = autocast
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        return sample(copy, reference, index, lambda: bool(waiting))
