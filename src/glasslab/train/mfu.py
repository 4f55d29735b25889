"""Model FLOPs utilisation: the FLOPs a step's tokens need by the model's arithmetic, per second, against the
machine's peak in the run's precision.

FLOPs per token are counted as nanoGPT and nanochat count them: 6N for the forward and backward matmuls of the N
parameters that take part in a matmul (every parameter but the token-embedding table, a lookup; with tied
embeddings the table is the head and counts), plus 12·L·H·Q·T for attention's two matmuls over a context of T
positions (L layers, H query heads of width Q), at T = the model's block_size. Norm weights count in N too; at
these widths they are a negligible share.

The peak: on CUDA, the device's dense tensor-core figure from a specification table (measured when the device is
not in it); on CPU, measured once per machine: the best of a few large matmuls in the run's precision and thread
count, cached in `peak_flops.json` under the user's cache directory (`GLASSLAB_CACHE_DIR`, else
`$XDG_CACHE_HOME/glasslab`, else `~/.cache/glasslab`). A peak measured on a busy machine is low, and so makes MFU
high: it is kept only when the load average was at most the core count (else measured again by the next run);
delete the file to measure again.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from glasslab.track.atomic import write_json_atomic

PEAK_FILE = "peak_flops.json"

# Dense (no sparsity) peak FLOP/s of CUDA devices by a substring of their name, first match wins: bfloat16 on the
# tensor cores, and float32 without TF32 (torch's default matmul precision).
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bfloat16": 756e12, "float32": 51.2e12}),
    ("H100", {"bfloat16": 989.4e12, "float32": 66.9e12}),
    ("A100", {"bfloat16": 312e12, "float32": 19.5e12}),
    ("L4", {"bfloat16": 121e12, "float32": 30.3e12}),
]


def flops_per_token(model: nn.Module) -> float:
    """Training FLOPs per token of a `GPT`: 6N + 12·L·H·Q·T (module docstring)."""
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters())  # a tied weight is listed once
    if not cfg.tie_embeddings:
        n -= model.wte.weight.numel()
    head_dim = cfg.n_embd // cfg.n_head
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * head_dim * cfg.block_size


def cache_dir() -> Path:
    if os.environ.get("GLASSLAB_CACHE_DIR"):
        return Path(os.environ["GLASSLAB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glasslab"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), so a cached peak is never read on another machine."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def measure_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 4) -> float:
    """FLOP/s of the fastest of `reps` n×n matmuls in `dtype` (after one untimed): the ceiling a training step's
    matmuls could reach on this device at this thread count."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The peak FLOP/s MFU divides by, for this device, the run's matmul dtype and (on CPU) thread count."""
    precision = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, peaks in GPU_PEAKS:
            if pattern in name and precision in peaks:
                return peaks[precision]
        key = f"cuda|{name}|{precision}"
    else:
        key = f"{device.type}|{cpu_name()}|threads={torch.get_num_threads()}|{precision}"
    path = cache_dir() / PEAK_FILE
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return float(cached[key])
    peak = measure_peak(device, dtype)
    if device.type != "cpu" or quiet_cpu():  # a peak measured beside other work is too low, and would stay so
        cached[key] = peak
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, cached)
    return peak


def quiet_cpu() -> bool:
    """Is the machine idle enough for a CPU peak worth keeping: a 1-minute load average no higher than its cores?"""
    return os.getloadavg()[0] <= (os.cpu_count() or 1)
