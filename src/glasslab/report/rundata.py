"""Everything a report reads from one run directory, loaded once into plain Python and numpy.

Every part is optional: a run that is still going, or whose stages logged only some metric families,
gives a RunData with only those parts, and the report shows only the sections that have data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from glasslab.track.atomic import read_jsonl
from glasslab.track.metrics import read_metrics
from glasslab.track.rundir import RunDir


@dataclass
class Series:
    steps: np.ndarray  # int64
    values: np.ndarray  # float64, NaN where the logged value was NaN
    times: np.ndarray  # float64 Unix seconds

    @property
    def last(self) -> float:
        return float(self.values[-1])


@dataclass
class RunData:
    path: Path
    manifest: dict[str, Any]
    config: dict[str, Any]
    config_text: str
    metrics: dict[str, dict[str, Series]]  # stage -> metric name -> series, stages in the order they ran
    events: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    spikes: list[dict] = field(default_factory=list)  # dossiers, by step
    rollouts: dict[int, list[dict]] = field(default_factory=dict)  # step -> completions
    evals: dict[str, list[dict]] = field(default_factory=dict)  # "<task>-seed<S>" -> records
    final_eval: dict[str, dict] = field(default_factory=dict)  # eval/final.json: stage -> environment -> summary
    profiles: dict[str, dict] = field(default_factory=dict)  # profile/<stage>/summary.json: stage -> time by part

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def stages(self) -> list[str]:
        return list(self.metrics)

    def names(self, stage: str | None = None) -> set[str]:
        stages = [stage] if stage else self.stages
        return {n for s in stages for n in self.metrics.get(s, {})}

    def final(self, name: str, stage: str | None = None) -> float | None:
        """The last logged value of `name` (in `stage`, or in the last stage that logged it)."""
        stages = [stage] if stage else reversed(self.stages)
        for s in stages:
            if name in self.metrics.get(s, {}):
                return self.metrics[s][name].last
        return None


def load_run(path: Path) -> RunData:
    """Read a run directory through RunDir; a missing manifest is the only fatal problem."""
    run = RunDir.open(Path(path))
    config_text = run.config_text()
    return RunData(
        path=run.path,
        manifest=dict(run.read_manifest()),
        config=run.read_config(),
        config_text=config_text,
        metrics=_metric_series(run.path),
        events=run.events(),
        samples=run.samples(),
        spikes=_spike_dossiers(run),
        rollouts={step: read_jsonl(p) for step, p in run.rollout_files()},
        evals={p.stem: read_jsonl(p) for p in run.eval_tables()},
        final_eval=run.read_final_eval(),
        profiles=run.read_profiles(),
    )


def _metric_series(path: Path) -> dict[str, dict[str, Series]]:
    table = read_metrics(path)
    if table.num_rows == 0:
        return {}
    grouped = table.group_by(["stage", "name"], use_threads=False).aggregate(
        [("step", "list"), ("value", "list"), ("time", "list")]
    )
    out: dict[str, dict[str, Series]] = {s: {} for s in dict.fromkeys(table["stage"].to_pylist())}
    for stage, name, steps, values, times in zip(
        grouped["stage"].to_pylist(),
        grouped["name"].to_pylist(),
        grouped["step_list"].to_pylist(),
        grouped["value_list"].to_pylist(),
        grouped["time_list"].to_pylist(),
    ):
        out[stage][name] = Series(
            np.asarray(steps, dtype=np.int64),
            np.asarray([np.nan if v is None else v for v in values], dtype=np.float64),
            np.asarray(times, dtype=np.float64),
        )
    return out


def _spike_dossiers(run: RunDir) -> list[dict]:
    dossiers = []
    for step, p in run.spike_files():
        try:
            dossier = json.loads(p.read_text())
        except ValueError:  # being written right now, or torn: the next report picks it up
            continue
        dossiers.append(dossier if isinstance(dossier, dict) else {"step": step, "dossier": dossier})
        dossiers[-1].setdefault("step", step)
    return dossiers
