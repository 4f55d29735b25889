"""Generating ahead (rl.generate_ahead): the next rollout batch is sampled in a background thread while the
current one trains, so generation and training share the machine instead of taking turns.

Sampling runs on a copy of the policy, refreshed from it before each batch starts. Batch k+1 therefore comes
from the weights that train on batch k: the policy trained on a batch is one optimizer step newer than the one
that sampled it, and the objective's importance ratio against the sampling policy (π_old) corrects for that.
The copy carries no probe hooks, and the order of events does not depend on thread timing, so a run is
deterministic at a seed. PyTorch releases the GIL inside its kernels, so two Python threads use two cores.
PyTorch's intra-op thread count is one per process: while generating ahead it is halved, so the two threads
together use the cores one used before (more would oversubscribe them), and `close` restores it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

import torch

from glasslab.model.gpt import GPT

T = TypeVar("T")


class Ahead(Generic[T]):
    """One background worker thread and the policy copy it samples with."""

    def __init__(self, policy: GPT) -> None:
        device = next(policy.parameters()).device
        # Its random init is overwritten at every refresh, and must not move the trainer's random stream (dropout):
        # a run resumed from a checkpoint makes the copy at another step than the run it continues.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.copy = GPT(policy.cfg).to(device).eval().requires_grad_(False)
        self.device_type = device.type
        self._threads = torch.get_num_threads()
        half = max(1, self._threads // 2)
        torch.set_num_threads(half)
        self._pool = ThreadPoolExecutor(1, "glasslab-rollouts", initializer=_start_worker, initargs=(half,))
        self._future: Future[T] | None = None

    def refresh(self, policy: GPT) -> GPT:
        """Copy the policy's current weights into the sampling copy (nothing may be running on it)."""
        assert self._future is None, "refresh while a batch is being sampled"
        with torch.no_grad():
            for mine, theirs in zip(self.copy.parameters(), policy.parameters(), strict=True):
                mine.copy_(theirs)
        return self.copy

    def start(self, sample: Callable[[GPT], T]) -> None:
        """Run sample(copy) in the background, under the caller's autocast (autocast is per thread)."""
        dtype, enabled = torch.get_autocast_dtype(self.device_type), torch.is_autocast_enabled(self.device_type)

        def job() -> T:
            with torch.autocast(self.device_type, dtype=dtype, enabled=enabled):
                return sample(self.copy)

        self._future = self._pool.submit(job)

    def wait(self) -> T | None:
        """The batch being sampled, once it is done (None if none was started); errors in the worker re-raise here."""
        future, self._future = self._future, None
        return future.result() if future is not None else None

    def close(self) -> None:
        """Finish the batch in flight, stop the thread, and give the process its intra-op threads back."""
        self._pool.shutdown(wait=True)
        torch.set_num_threads(self._threads)


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    # Autocast's cache of weight casts is shared by every thread, and a thread leaving its outermost autocast
    # context (even a disabled one, as sampling's) clears it. Cleared in the middle of the trainer's step, a weight
    # used by two forwards gets two casts, so its gradient is summed in float32 instead of bf16: a difference in
    # the last bits that would depend on thread timing. Nested for the worker's whole life, it never clears it.
    torch.autocast_increment_nesting()
