"""One self-contained HTML page: styles, uPlot, the figure data and the drawing script all inline.

The page needs no network: it can be mailed, archived next to a paper, or opened from a laptop offline.
Figure data travels as one JSON block; report.js draws each figure into its placeholder.
"""

from __future__ import annotations

import json
from datetime import datetime
from html import escape
from importlib import resources
from typing import Any

import glasslab
from glasslab.report.sections import Section

_HERE = resources.files("glasslab.report")


def _asset(name: str) -> str:
    return _HERE.joinpath(name).read_text(encoding="utf-8")


def _script_json(obj: Any) -> str:
    """JSON that cannot end its <script> element early."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def render_page(title: str, sections: list[Section], *, subtitle: str = "") -> str:
    figures: dict[str, dict[str, Any]] = {}
    body = []
    for sec in sections:
        parts = [f'<section id="{escape(sec.id)}"><h2>{escape(sec.title)}</h2>']
        if sec.intro:
            parts.append(f'<p class="intro">{escape(sec.intro)}</p>')
        grid: list[str] = []
        for item in sec.items:
            if item["type"] == "html":
                if grid:
                    parts.append(f'<div class="grid">{"".join(grid)}</div>')
                    grid = []
                parts.append(item["html"])
                continue
            fid = f"fig{len(figures)}"
            figures[fid] = item
            wide = " wide" if item.get("wide") else ""
            note = f'<div class="fig-note">{escape(item["note"])}</div>' if item.get("note") else ""
            grid.append(
                f'<div class="figure{wide}" id="{fid}" data-fig="{fid}"><div class="fig-head">'
                f'<span class="fig-title">{escape(item["title"])}</span>'
                f'<button class="png" type="button" title="download this figure as PNG">PNG</button></div>'
                f'<div class="fig-body"></div>{note}</div>'
            )
        if grid:
            parts.append(f'<div class="grid">{"".join(grid)}</div>')
        parts.append("</section>")
        body.append("".join(parts))
    toc = "".join(f'<a href="#{escape(s.id)}">{escape(s.title)}</a>' for s in sections)
    stamp = f"glasslab {glasslab.__version__}, {datetime.now():%Y-%m-%d %H:%M}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<style>{_asset("vendor/uPlot.min.css")}</style>
<style>{_asset("report.css")}</style>
</head><body>
<header><h1>{escape(title)}</h1><p class="muted">{escape(subtitle)} · {escape(stamp)}</p><nav>{toc}</nav></header>
<main>{"".join(body)}</main>
<footer class="muted">Charts: drag to zoom, double-click to reset, hover for values; PNG saves a figure.
Made with glasslab; charts drawn with uPlot (MIT licence, below).</footer>
<script>/*! uPlot, MIT licence:
{_asset("vendor/uPlot.LICENSE")}*/
{_asset("vendor/uPlot.iife.min.js")}</script>
<script type="application/json" id="glasslab-figures">{_script_json(figures)}</script>
<script>{_asset("report.js")}</script>
</body></html>
"""
