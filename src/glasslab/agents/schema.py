"""The config schema an agent reads before proposing a change: every key with its type, its default and its help.

The help is the comment the key carries in config.py (on its line, or the comment lines just above it), so
the schema an agent sees is the one a person reads in the source, never a second copy that drifts from it.
"""

from __future__ import annotations

import inspect
import io
import tokenize
from functools import cache
from typing import Any, get_origin

from pydantic import BaseModel

from glasslab.config import PRESETS, Config, preset_dict


@cache
def field_comments(cls: type[BaseModel]) -> dict[str, str]:
    """field name -> its comment in the class's source (trailing on its line, else the lines just above)."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out: dict[str, str] = {}
    for name in cls.model_fields:
        for i, line in enumerate(lines, start=1):
            if line.strip().startswith(f"{name}:"):
                if i in comments and not line.strip().startswith("#"):
                    out[name] = comments[i]
                else:
                    above, j = [], i - 1
                    while j in comments and lines[j - 1].strip().startswith("#"):
                        above.insert(0, comments[j])
                        j -= 1
                    if above:
                        out[name] = " ".join(above)
                break
    return out


def _type_text(annotation: Any) -> str:
    if get_origin(annotation) is None and isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _section(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def config_schema() -> list[dict[str, Any]]:
    """One row per key, dotted as `--set` takes it, with the default of the whole default config (a nested
    section's defaults can differ from its class's: sft.train is not train)."""
    defaults = Config().model_dump()
    rows: list[dict[str, Any]] = []

    def walk(cls: type[BaseModel], prefix: str, values: dict[str, Any]) -> None:
        helps = field_comments(cls)
        doc = inspect.getdoc(cls) if cls is not Config else None
        for name, info in cls.model_fields.items():
            sub = _section(info.annotation)
            if sub is not None:
                walk(sub, f"{prefix}{name}.", values[name])
                continue
            rows.append(
                {
                    "key": f"{prefix}{name}",
                    "type": _type_text(info.annotation),
                    "default": values.get(name),
                    "help": helps.get(name, ""),
                    "section_help": doc or "",
                }
            )

    walk(Config, "", defaults)
    return rows


def presets() -> dict[str, dict[str, Any]]:
    """Each preset's layer over the defaults (only the keys it sets)."""
    return {name: preset_dict(name) for name in PRESETS}
