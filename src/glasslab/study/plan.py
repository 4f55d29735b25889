"""Expansion of a spec into concrete runs: every combination of factor levels, times every seed.

Each run is a name and the `--set` overrides that make it; every run's config is resolved (validated) here,
so a typo in a spec fails before anything trains.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import tomli_w

from glasslab.config import resolve
from glasslab.errors import GlasslabError
from glasslab.study.spec import DEFAULT, StudySpec
from glasslab.track.layout import PRETRAIN, RL, SFT

STEP_KEYS = {PRETRAIN: "train.steps", SFT: "sft.train.steps", RL: "rl.train.steps"}
BASE_NAME = "base"


@dataclass
class PlannedRun:
    name: str
    seed: int
    stages: list[str]
    sets: list[str]  # --set KEY=VALUE pairs, in order
    levels: dict[str, Any] = field(default_factory=dict)  # factor name -> value
    from_base: bool = False
    env: dict[str, str] = field(default_factory=dict)  # extra environment (a patched tree's PYTHONPATH)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.env:  # plan.json of runs without one reads as before
            del out["env"]
        return out


@dataclass
class Plan:
    spec: StudySpec
    scale: float
    seeds: list[int]
    base: PlannedRun | None
    runs: list[PlannedRun]

    def levels(self, factor: str) -> list[Any]:
        return list(dict.fromkeys(r.levels[factor] for r in self.runs))


def toml_literal(value: Any) -> str:
    """A scalar or list as `--set` reads it back (a TOML literal, on one line). Tables are flattened first; those
    inside a list (a list of tables, such as a mixture schedule) are written inline."""
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_literal(v)}" for k, v in value.items()) + "}"
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_value(dump: dict[str, Any], key: str) -> Any:
    node: Any = dump
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise GlasslabError(f"config key '{key}' does not exist: check the study spec's factor keys")
        node = node[part]
    return node


def level_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_name(levels: dict[str, Any], seed: int) -> str:
    parts = [f"{k}={level_text(v)}" for k, v in levels.items()] + [f"seed{seed}"]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))


def expand(spec: StudySpec, *, scale: float = 1.0, seeds: int | None = None) -> Plan:
    """`scale` multiplies every stage's steps; `seeds` replaces the spec's seeds by 0..seeds-1."""
    if scale <= 0:
        raise GlasslabError(f"--scale {scale} must be positive: e.g. 2 doubles every stage's steps")
    seed_list = list(range(seeds)) if seeds else list(spec.seeds)
    if not seed_list:
        raise GlasslabError("a study needs at least one seed: use --seeds 1 or more")
    common = [f"{k}={toml_literal(v)}" for k, v in flatten(spec.overrides).items()]
    base_cfg = resolve(spec.preset, None, common).model_dump()
    if scale != 1.0:
        common += [f"{STEP_KEYS[s]}={max(1, round(config_value(base_cfg, STEP_KEYS[s]) * scale))}" for s in spec.stages]
    levels = [[config_value(base_cfg, f.key) if v == DEFAULT else v for v in f.values] for f in spec.factors]
    base = None
    if spec.shared_stages:
        base_seed = spec.base_seed if spec.base_seed is not None else seed_list[0]
        base = PlannedRun(BASE_NAME, base_seed, list(spec.shared_stages), list(common))
    study_stages = spec.stages[len(spec.shared_stages) :]
    runs = []
    for combo in itertools.product(*levels):
        chosen = {f.name: v for f, v in zip(spec.factors, combo)}
        sets = common + [
            f"{k}={toml_literal(x)}" for f, v in zip(spec.factors, combo) for k, x in flatten({f.key: v}).items()
        ]
        resolve(spec.preset, None, sets)  # fail now on a bad key or value, naming it
        for seed in seed_list:
            runs.append(
                PlannedRun(run_name(chosen, seed), seed, list(study_stages), sets, chosen, from_base=base is not None)
            )
    names = [r.name for r in runs]
    if len(set(names)) != len(names) or BASE_NAME in names:
        raise GlasslabError("two study runs would get the same name: give the factors distinct values")
    return Plan(spec, scale, seed_list, base, runs)
