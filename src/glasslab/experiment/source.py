"""The code a run executes, as a hash: two runs share a result only if their code is identical, so a baseline run
made before an edit to glasslab is not reused after it."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import glasslab

SOURCE_SUFFIXES = (".py", ".toml", ".js", ".css")


@cache
def code_hash(package_dir: Path | None = None) -> str:
    """sha256 over the glasslab package's source files (path and bytes), whatever git says: local edits count."""
    root = Path(package_dir or Path(glasslab.__file__).parent)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_commit() -> str | None:
    """HEAD of the checkout glasslab runs from (None for an installed package)."""
    from glasslab.track.rundir import _git_commit

    return _git_commit()
