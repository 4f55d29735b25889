"""Crash-safe file writes.

Whole files (config, manifest, parquet) are written to a temp file in the same directory,
fsynced and renamed over the target, so a reader or a resumed run never sees half a file.
Logs (samples, events) are appended line by line; a line torn by a crash is skipped on read.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def fsync_file(path: Path) -> None:
    """Push a file's data to disk (a rename alone does not order data before the new name)."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable. Directories cannot be opened for fsync on Windows."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step: readers see the old file or the new one, never a mix."""
    path = Path(path)
    # A name we create ourselves (not mkstemp) so the file gets the usual umask permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: Path, obj: dict) -> None:
    """Append one JSON line. If a crash left a torn last line, start on a fresh line so only that one is lost."""
    line = (json.dumps(obj) + "\n").encode("utf-8")
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    """All complete records of a JSONL file ([] if it does not exist). Lines torn by a crash are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # torn write (JSONDecodeError or invalid UTF-8)
            continue
    return records
