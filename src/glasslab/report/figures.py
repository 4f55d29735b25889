"""Figure specs: plain JSON-ready dicts that the page's script draws (uPlot for lines, a canvas for heat maps).

Building them here keeps the browser side dumb: it receives aligned x/y arrays (None for gaps) and draws.
Long series are thinned by keeping each bucket's minimum and maximum, so spikes survive the thinning.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

MAX_POINTS = 2000  # per line series
MAX_COLUMNS = 400  # per heat map

Figure = dict[str, Any]


def natural_key(text: str) -> list:
    """'blocks.10' sorts after 'blocks.9'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def thin(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ~max_points points: per bucket the min and the max of y (in x order), always keeping the last."""
    n = len(x)
    if n <= max_points:
        return x, y
    edges = np.linspace(0, n, max_points // 2 + 1).astype(int)
    keep = [n - 1]
    for lo, hi in itertools.pairwise(edges.tolist()):
        chunk = y[lo:hi]
        finite = np.isfinite(chunk)
        if not finite.any():
            keep.append(lo)
            continue
        idx = np.flatnonzero(finite)
        keep += [lo + idx[np.argmin(chunk[idx])], lo + idx[np.argmax(chunk[idx])]]
    kept = np.unique(keep)
    return x[kept], y[kept]


def _json_values(values: np.ndarray) -> list[float | None]:
    """JSON has no NaN or inf: those become gaps."""
    return [float(v) if math.isfinite(v) else None for v in values.tolist()]


def lines(
    title: str,
    series: Sequence[tuple[str, np.ndarray, np.ndarray]],
    *,
    xlabel: str = "step",
    ylabel: str = "",
    ylog: bool = False,
    note: str = "",
    wide: bool = False,
) -> Figure:
    """One chart of several (label, x, y) series, put on the union of their x values."""
    thinned = [(label, *thin(np.asarray(x), np.asarray(y, dtype=np.float64))) for label, x, y in series]
    xs = np.unique(np.concatenate([x for _, x, _ in thinned])) if thinned else np.array([])
    out = []
    for label, x, y in thinned:
        aligned = np.full(len(xs), np.nan)
        aligned[np.searchsorted(xs, x)] = y
        out.append({"label": label, "y": _json_values(aligned), "points": int(np.isfinite(y).sum()) <= 25})
    return {
        "type": "lines",
        "title": title,
        "x": [float(v) for v in xs.tolist()],
        "xlabel": xlabel,
        "ylabel": ylabel,
        "ylog": ylog,
        "series": out,
        "note": note,
        "wide": wide,
    }


def interval_lines(
    title: str,
    series: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    *,
    xlabel: str = "step",
    ylabel: str = "",
    note: str = "",
) -> Figure:
    """Like `lines`, for short (label, x, y, half-width) series: each line gets a band y ± half-width (NaN: no
    band at that x). Nothing is thinned, so only for a few points per series (e.g. loss per position bucket)."""
    fig = lines(title, [(label, x, y) for label, x, y, _ in series], xlabel=xlabel, ylabel=ylabel, note=note)
    xs = np.asarray(fig["x"])
    for out, (_, x, y, half) in zip(fig["series"], series):
        for key, sign in (("lo", -1.0), ("hi", 1.0)):
            aligned = np.full(len(xs), np.nan)
            aligned[np.searchsorted(xs, np.asarray(x))] = np.asarray(y, dtype=np.float64) + sign * np.asarray(half)
            out[key] = _json_values(aligned)
    return fig


def heatmap(
    title: str,
    rows: Sequence[tuple[str, np.ndarray, np.ndarray]],
    *,
    log: bool = True,
    threshold: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    xlabel: str = "step",
    note: str = "",
) -> Figure:
    """Rows of (label, steps, values) on a shared step axis: rows = blocks or parameters, columns = steps.
    With `threshold`, cells below it are outlined (e.g. attention-entropy collapse)."""
    steps = np.unique(np.concatenate([np.asarray(s) for _, s, _ in rows]))
    if len(steps) > MAX_COLUMNS:  # keep real logged steps, evenly spaced, and the last one
        steps = steps[np.unique(np.r_[np.linspace(0, len(steps) - 1, MAX_COLUMNS).astype(int), len(steps) - 1])]
    z = []
    for _, s, v in rows:
        cell = np.full(len(steps), np.nan)
        pos = np.searchsorted(steps, s)
        hit = (pos < len(steps)) & (steps[np.minimum(pos, len(steps) - 1)] == s)
        cell[pos[hit]] = np.asarray(v, dtype=np.float64)[hit]
        z.append(_json_values(cell))
    return {
        "type": "heatmap",
        "title": title,
        "rows": [label for label, _, _ in rows],
        "x": [int(v) for v in steps.tolist()],
        "z": z,
        "log": log,
        "threshold": threshold,
        "vmin": vmin,
        "vmax": vmax,
        "xlabel": xlabel,
        "note": note,
        "wide": True,
    }


_BUCKET_NUMBERS = re.compile(r"\d+")


def position_bucket(label: str) -> tuple[float, float] | None:
    """Token positions a `loss_by_pos/<bucket>` name covers: '000-015' -> (0, 15), 'p32' -> (32, 32).
    None when the name holds no number (then the bucket keeps its logging order)."""
    numbers = [int(n) for n in _BUCKET_NUMBERS.findall(label)]
    if not numbers:
        return None
    return float(numbers[0]), float(numbers[1] if len(numbers) > 1 else numbers[0])
