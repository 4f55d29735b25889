"""Data-parallel training under `torchrun`, with standard torch.distributed: one process per device,
gradients all-reduced by DistributedDataParallel, each rank drawing its own batches, rank 0 writing the run.

Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_from_env(requested: str) -> torch.device | None:
    """Join the process group torchrun describes; returns this rank's device, or None when not distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    use_cuda = torch.cuda.is_available() and requested in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def wrap(model: nn.Module) -> nn.Module:
    """The module to run training forwards through: DDP when distributed, else the model itself."""
    if world_size() == 1:
        return model
    device_ids = [next(model.parameters()).device.index] if next(model.parameters()).is_cuda else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if dist.is_initialized():
        dist.barrier()


def main_values(*xs: float) -> list[float]:
    """Rank 0's values on every rank: what must be decided the same everywhere (when a budget is spent)."""
    if not dist.is_initialized():
        return list(xs)
    t = torch.tensor(xs, dtype=torch.float64)
    dist.broadcast(t, src=0)
    return t.tolist()
