"""How probe metrics are named after the model's parameters and modules (no torch here: the view uses it too)."""

from __future__ import annotations

import re

ROUTER_PREFIX = "moe/"  # every MoE router metric's name starts with this (probes/router.py)


def param_key(name: str) -> str:
    """`blocks.3.attn.q.weight` -> `blocks.3.attn.q`: the metric suffix of a parameter."""
    return name.removesuffix(".weight")


def unit_of(key: str) -> str:
    """The block a parameter belongs to: `blocks.3` for `blocks.3.attn.q`, else its top-level module (`wte`)."""
    parts = key.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1].isdigit() else parts[0]


def groups_of(key: str) -> list[str]:
    """The modules a parameter is aggregated into: every proper prefix of two or more parts
    (`blocks.3.attn.q` -> `blocks.3`, `blocks.3.attn`)."""
    parts = key.split(".")
    return [".".join(parts[:n]) for n in range(2, len(parts))]


def natural_key(name: str) -> list:
    """Sort `blocks.10` after `blocks.9`."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
