"""A code change as a candidate: the patch is applied to an isolated copy of the user's tree (a glasslab checkout,
or a directory with the user's own plug-in modules), never to the user's files, and the candidate's runs import
from that copy first (PYTHONPATH: its src/ if it has one, then its root).

The copy holds what git would see (tracked and untracked files, .gitignore respected) or, outside git, every
file but virtual environments, caches and the experiments directory. It lives in `<experiments>/trees/<hash>/`,
named by the patch and the tree's content, so an experiment repeated on the same tree and patch reuses it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from glasslab.errors import GlasslabError
from glasslab.track import layout

SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules"}
DONE = ".glasslab-patched"  # written last: a copy without it was interrupted and is made again


@dataclass
class PatchedTree:
    path: Path
    patch_sha256: str
    patch_text: str
    tree_sha256: str

    def env(self) -> dict[str, str]:
        """The environment the candidate's runs need: the copy first on the import path."""
        first = [str(self.path / "src")] if (self.path / "src").is_dir() else []
        rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return {"PYTHONPATH": os.pathsep.join([*first, str(self.path), *rest])}


def tree_files(tree: Path, exclude: Path) -> list[Path]:
    """Files of `tree` a copy needs, relative to it, leaving out `exclude` (the experiments directory)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=tree, capture_output=True, timeout=60
        )
        names = [Path(n) for n in out.stdout.decode().split("\0") if n] if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        names = None
    if names is None:
        names = [
            p.relative_to(tree)
            for p in tree.rglob("*")
            if p.is_file() and not SKIP_DIRS & set(p.relative_to(tree).parts)
        ]
    excluded = exclude.resolve()
    return sorted(
        n
        for n in names
        if (tree / n).is_file() and excluded not in (tree / n).resolve().parents and not SKIP_DIRS & set(n.parts)
    )


def patched_tree(patch: Path, tree: Path, root: Path) -> PatchedTree:
    """Copy `tree` (less `root`) into `root`/trees/<hash>/ and apply `patch` there. Raises GlasslabError, having
    made nothing, when the patch does not apply."""
    patch, tree, root = Path(patch), Path(tree).resolve(), Path(root)
    if not tree.is_dir():
        raise GlasslabError(f"--tree '{tree}' is not a directory: give the source tree the patch applies to")
    data = patch.read_bytes()
    files = tree_files(tree, root)
    h = hashlib.sha256()
    for name in files:
        h.update(str(name).encode() + b"\0" + (tree / name).read_bytes() + b"\0")
    tree_sha, patch_sha = h.hexdigest(), hashlib.sha256(data).hexdigest()
    dest = root / layout.EXPERIMENT_TREES / hashlib.sha256((tree_sha + patch_sha).encode()).hexdigest()[:12]
    result = PatchedTree(dest, patch_sha, data.decode("utf-8", errors="replace"), tree_sha)
    if (dest / DONE).is_file():
        return result
    tmp = dest.with_name(f"{layout.TMP_PREFIX}{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in files:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree / name, tmp / name)
    tmp.mkdir(parents=True, exist_ok=True)
    # Outside any repository (the ceiling), git apply patches paths relative to the copy, and only there.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(tmp.parent.resolve())}
    applied = subprocess.run(
        ["git", "apply", "--whitespace=nowarn", str(patch.resolve())], cwd=tmp, env=env, capture_output=True, text=True
    )
    if applied.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        why = (applied.stderr.strip().splitlines() or ["no output"])[0]
        raise GlasslabError(f"--patch {patch} does not apply to {tree} ({why}): make it with git diff in that tree")
    (tmp / DONE).write_text(patch_sha + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return result


def default_tree() -> Path:
    """The working tree the user is in: its git top level, else the current directory."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return Path.cwd()
    return Path(top.stdout.strip()) if top.returncode == 0 and top.stdout.strip() else Path.cwd()
