"""Paper figures: metrics matching a glob, from one or more runs, as PNG, PDF or SVG via matplotlib."""

from __future__ import annotations

from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import numpy as np

from glasslab.errors import GlasslabError
from glasslab.report.compare import Align, aligned_x, run_labels
from glasslab.report.figures import natural_key
from glasslab.report.rundata import load_run

FORMATS = (".png", ".pdf", ".svg")

# Publication defaults: small serif-free type that survives a two-column layout, no chart junk.
STYLE: dict[str, Any] = {
    "figure.figsize": (5.5, 3.4),
    "figure.dpi": 100,
    "savefig.dpi": 200,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.4,
    "legend.frameon": False,
    "svg.fonttype": "none",
    "pdf.fonttype": 42,
}


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average with bias correction (as TensorBoard's smoothing): NaNs are skipped."""
    out = np.full_like(values, np.nan, dtype=np.float64)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(values):
        if np.isfinite(v):
            acc = weight * acc + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        out[i] = acc / norm if norm else np.nan
    return out


def plot_metric(
    run_paths: list[Path],
    pattern: str,
    out: Path,
    *,
    stage: str | None = None,
    smooth: float = 0.0,
    align: Align = "step",
    logy: bool = False,
    title: str | None = None,
) -> Path:
    """One figure of every (run, stage, metric) whose name matches `pattern`; returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise GlasslabError(f"cannot write '{out.name}': give --out a .png, .pdf or .svg name")
    if align not in ("step", "tokens"):
        raise GlasslabError(f"unknown alignment '{align}': use step or tokens")
    if not 0.0 <= smooth < 1.0:
        raise GlasslabError(f"--smooth {smooth} is out of range: use a weight in [0, 1), e.g. 0.9")
    runs = [load_run(Path(p)) for p in run_paths]
    labels = run_labels(runs)
    lines = []  # (run, label, stage, name)
    for run, label in zip(runs, labels):
        for st in [stage] if stage else run.stages:
            for name in sorted(run.metrics.get(st, {}), key=natural_key):
                if fnmatchcase(name, pattern) and len(run.metrics[st][name].steps):
                    lines.append((run, label, st, name))
    if not lines:
        available = sorted(set().union(*(r.names(stage) for r in runs)))
        where = f" in stage {stage}" if stage else ""
        raise GlasslabError(
            f"no metric matches '{pattern}'{where}: available are {', '.join(available[:10]) or 'none'}"
            f"{', ...' if len(available) > 10 else ''}"
        )
    several = {k: len({line[i] for line in lines}) > 1 for k, i in (("run", 1), ("stage", 2), ("name", 3))}

    def legend_label(label: str, st: str, name: str) -> str:
        parts = [label] if several["run"] else []
        parts += [st] if several["stage"] else []
        parts += [name] if several["name"] or not parts else []
        return " · ".join(parts)

    with plt.rc_context(STYLE):
        fig, ax = plt.subplots()
        colours = plt.get_cmap("tab10" if len(lines) <= 10 else "viridis")
        for i, (run, label, st, name) in enumerate(lines):
            s = run.metrics[st][name]
            x = aligned_x(run, st, s.steps, align)
            colour = colours(i % 10) if len(lines) <= 10 else colours(i / max(1, len(lines) - 1))
            if smooth:
                ax.plot(x, s.values, color=colour, alpha=0.25, linewidth=0.8)
                ax.plot(x, ema(s.values, smooth), color=colour, label=legend_label(label, st, name))
            else:
                ax.plot(
                    x,
                    s.values,
                    color=colour,
                    label=legend_label(label, st, name),
                    marker="o" if len(x) < 30 else None,
                    markersize=3,
                )
        names = {line[3] for line in lines}
        ax.set_xlabel("tokens" if align == "tokens" else "step")
        ax.set_ylabel(next(iter(names)) if len(names) == 1 else pattern)
        if logy:
            ax.set_yscale("log")
        if title:
            ax.set_title(title)
        if len(lines) > 1:
            if len(lines) <= 8:
                ax.legend()
            else:
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(lines) // 16, fontsize=7)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, bbox_inches="tight")
        plt.close(fig)
    return out
