"""Run names are one path component, so a name can never place a run outside its runs directory."""

from __future__ import annotations

from glasslab.errors import GlasslabError


def check_run_name(name: str, option: str = "--name") -> str:
    """`name` unchanged if it is one safe path component; else a GlasslabError naming `option` (where the name
    came from) and the fix."""
    why = None
    if not name or not name.strip():
        why = "is empty"
    elif name in (".", ".."):
        why = "is a relative directory"
    elif "/" in name or "\\" in name:
        why = "contains a path separator"
    elif name.startswith("-"):
        why = "starts with '-', which reads as an option"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "contains a control character"
    if why:
        raise GlasslabError(f"{option} {name!r} {why}: give a name that is one path component, e.g. my-run-2")
    return name
