"""Mixed precision: which dtype training matmuls run in under autocast. Weights, gradients and optimizer
state stay float32; bfloat16 matmuls shorten a CPU training step where the hardware has bf16 dot products
(bench/throughput.py; figures in docs/BENCHMARKS.md)."""

from __future__ import annotations

import torch


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype for `system.precision` on this device type, or None for plain float32."""
    if precision == "float32":
        return None
    if precision == "bfloat16" or fast_bf16(device_type):
        return torch.bfloat16
    return None


def fast_bf16(device_type: str) -> bool:
    """Does this device type multiply bfloat16 matrices natively (not by emulation)?"""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False
