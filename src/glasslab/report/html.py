"""Small HTML helpers: escaping, number formatting and tables, shared by the run, compare and study pages."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any


def fmt(value: Any) -> str:
    """Numbers to 4 significant digits, NaN/inf spelt out, containers as compact JSON."""
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def cell(value: Any, limit: int = 400) -> str:
    """An escaped table cell; long text is cut, with the whole of it in the tooltip."""
    text = fmt(value)
    if len(text) > limit:
        return f'<span title="{escape(text)}">{escape(text[:limit])}…</span>'
    return escape(text)


def table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], *, cls: str = "", row_classes: Sequence[str] = ()
) -> str:
    """Text cells of `records` tables scroll past a few lines, so one long completion cannot flood the page."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        rc = f' class="{row_classes[i]}"' if i < len(row_classes) and row_classes[i] else ""
        cells = (f'<div class="box">{cell(v)}</div>' if cls == "records" else cell(v) for v in row)
        body.append(f"<tr{rc}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def records_table(records: Sequence[dict], *, limit: int = 12, first: Sequence[str] = ()) -> str:
    """A table of JSON records with the union of their keys as columns (`first` ones leading)."""
    shown = list(records[:limit])
    keys = list(dict.fromkeys([k for k in first if any(k in r for r in shown)] + [k for r in shown for k in r]))
    html = table(keys, ([r.get(k) for k in keys] for r in shown), cls="records")
    if len(records) > limit:
        html += f'<p class="muted">showing {limit} of {len(records)}</p>'
    return html


def kv_table(pairs: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{cell(v)}</td></tr>" for k, v in pairs)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def paragraph(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{escape(text)}</p>' if cls else f"<p>{escape(text)}</p>"
