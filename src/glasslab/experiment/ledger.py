"""The ledger: one JSON object per experiment, one line each, in `<experiments dir>/ledger.jsonl`.

An append holds an exclusive lock on the file, cuts a torn last line left by a process killed mid-write (so no
half entry stays), writes the whole line in one call and fsyncs before returning: a process killed at any moment
loses no entry already written and leaves no half one. The reader skips a torn last line too, for a reader that
comes between a kill and the next append.
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from glasslab.track import layout
from glasslab.track.atomic import read_jsonl

FRESH_SEEDS_FROM = 1000  # seeds of confirmations and A/A checks; screening uses 0..N-1, reused across experiments


def ledger_path(root: Path) -> Path:
    return Path(root) / layout.LEDGER


def new_id() -> str:
    """Sortable by time, unique without coordination: `20261206-040632-3fa9`."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def append(path: Path, entry: dict[str, Any]) -> None:
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=False, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.lseek(fd, 0, os.SEEK_END)
        if size:
            keep = _complete_length(fd, size)
            if keep != size:
                os.ftruncate(fd, keep)
        os.lseek(fd, 0, os.SEEK_END)
        written = 0
        while written < len(line):
            written += os.write(fd, line[written:])
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


def _complete_length(fd: int, size: int) -> int:
    """The length of the file up to and including its last newline (0 if none)."""
    pos, chunk = size, 1 << 16
    while pos > 0:
        start = max(0, pos - chunk)
        data = os.pread(fd, pos - start, start)
        i = data.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def read(path: Path) -> list[dict[str, Any]]:
    """Every complete entry, oldest first ([] without a ledger)."""
    return [e for e in read_jsonl(Path(path)) if isinstance(e, dict) and "id" in e]


def find(path: Path, entry_id: str) -> dict[str, Any] | None:
    return next((e for e in read(path) if e["id"] == entry_id), None)


def used_seeds(entries: list[dict[str, Any]]) -> set[int]:
    seeds: set[int] = set()
    for e in entries:
        for rnd in e.get("rounds", []):
            for arm in rnd.get("arms", {}).values():
                seeds.update(r["seed"] for r in arm.get("runs", []))
    return seeds


def fresh_seeds(entries: list[dict[str, Any]], n: int, taken: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
    """n seeds no ledger entry has used (from FRESH_SEEDS_FROM up): a confirmation the loop never selected on."""
    used = used_seeds(entries) | set(taken)
    out, seed = [], FRESH_SEEDS_FROM
    while len(out) < n:
        if seed not in used:
            out.append(seed)
        seed += 1
    return out


def aa_rate(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """How often the rules called noise an effect, over the A/A checks in the ledger."""
    checks = [e for e in entries if e.get("kind") == "aa"]
    false_effects = sum(e.get("verdict") not in ("no effect", "inconclusive") for e in checks)
    false_kept = sum(e.get("decision") == "kept" for e in checks)
    return {"checks": len(checks), "false_effects": false_effects, "false_kept": false_kept}
