"""What an experiment compares: the baseline recipe (a preset or a config file, the budget, the stages) and the
candidate (the baseline plus `--set` overrides and/or a patch), each a run per seed.

A run is named by a hash of everything that decides its result except the seed: the resolved config, the stages
and the code (the glasslab source, and the patch). Two experiments that need the same baseline run therefore
name the same directory, and the study executor skips it once it is complete: reuse needs no bookkeeping.
Each run's `--set` list is the canonical difference of its config from the preset, so equal configs give equal
lists whatever order or spelling the user wrote them in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from glasslab.budget import parse_budget
from glasslab.config import PRESETS, Config, load_toml, resolve
from glasslab.errors import GlasslabError
from glasslab.study.plan import Plan, PlannedRun, flatten, toml_literal
from glasslab.study.spec import MetricSpec, StudySpec
from glasslab.track.layout import EVAL, EVAL_FAMILY, PIPELINE, PRETRAIN, RL, SFT

BASELINE, CANDIDATE = "baseline", "candidate"
Goal = Literal["auto", "min", "max"]
# Config sections each stage's result depends on; a change elsewhere (probes, or a stage not run) changes nothing.
READS = {
    PRETRAIN: {"model", "tokenizer", "data", "train", "system"},
    SFT: {"model", "tokenizer", "data", "sft", "envs", "eval", "system"},
    RL: {"rl", "envs", "eval", "system"},
}
TRAIN_PREFIX = {PRETRAIN: "train.", SFT: "sft.train.", RL: "rl.train."}
HIGHER_IS_BETTER = ("accuracy", "pass@", "reward")


@dataclass
class Request:
    """One experiment as the user (or an agent) states it; validated by `prepare`."""

    description: str
    sets: list[str] = field(default_factory=list)
    metric: str = "val/bpb"
    goal: Goal = "auto"
    seeds: int = 3
    budget: str | None = None
    base: str = "tiny"  # a preset name or a config TOML file
    base_sets: list[str] = field(default_factory=list)  # overrides the baseline itself carries (tune's best so far)
    stages: list[str] = field(default_factory=lambda: [PRETRAIN])
    min_effect: float = 0.0
    aa: bool = False
    patch: Path | None = None
    tree: Path | None = None  # the tree the patch applies to (default: the git top level of the working directory)


@dataclass
class Arms:
    """The validated experiment: both arms' configs and `--set` lists, and what differs between them."""

    request: Request
    preset: str
    goal: Literal["min", "max"]
    metric_stage: str
    baseline: Config
    candidate: Config
    baseline_sets: list[str]
    candidate_sets: list[str]
    changes: dict[str, list[Any]]  # key -> [baseline value, candidate value]
    refusal: str | None  # why this is not an experiment (seed only, nothing changed), else None

    def plan(
        self, name: str, seeds: dict[str, list[int]], arm_ids: dict[str, str], env: dict[str, dict[str, str]]
    ) -> Plan:
        """The runs of both arms, pairs interleaved (baseline seed 0, candidate seed 0, baseline seed 1, ...) so
        that with two workers a pair trains side by side, under the same load."""
        metric = MetricSpec(name=self.request.metric, stage=self.metric_stage)
        spec = StudySpec(name=name, preset=self.preset, stages=self.request.stages, seeds=[0], metrics=[metric])
        sets = {BASELINE: self.baseline_sets, CANDIDATE: self.candidate_sets}
        runs = []
        for pair in zip(seeds[BASELINE], seeds[CANDIDATE]):
            for arm, seed in zip((BASELINE, CANDIDATE), pair):
                runs.append(
                    PlannedRun(
                        f"{arm_ids[arm]}-seed{seed}",
                        seed,
                        list(self.request.stages),
                        sets[arm],
                        {"arm": arm},
                        env=env.get(arm, {}),
                    )
                )
        return Plan(spec, 1.0, sorted({s for v in seeds.values() for s in v}), None, runs)


def goal_of(metric: str, goal: Goal) -> Literal["min", "max"]:
    if goal != "auto":
        return goal
    return "max" if any(word in metric for word in HIGHER_IS_BETTER) else "min"


def metric_stage_of(metric: str, stages: list[str]) -> str:
    """eval/<task>/after_<stage>/... is logged by the final evaluation (stage `eval`); anything else by the last
    stage trained."""
    return EVAL if metric.startswith(f"{EVAL_FAMILY}/") and "/after_" in metric else stages[-1]


def budget_sets(budget: str | None, stages: list[str]) -> list[str]:
    """The budget for every stage; a step budget also sets the stage's steps, so its schedule ends with it."""
    if budget is None:
        return []
    try:
        b = parse_budget(budget)
    except ValueError as e:
        raise GlasslabError(f"--budget: {e}") from None
    out = []
    for stage in stages:
        out.append(f"{TRAIN_PREFIX[stage]}budget={toml_literal(str(b))}")
        if b.unit == "steps":
            out.append(f"{TRAIN_PREFIX[stage]}steps={int(b.amount)}")
    return out


def base_layers(base: str) -> tuple[str, list[str]]:
    """The preset runs start from, and the overrides a config file adds to it (flattened to `--set` pairs)."""
    if base in PRESETS:
        return base, []
    path = Path(base)
    if path.suffix != ".toml" and not path.is_file():
        raise GlasslabError(f"--base '{base}' is neither a preset ({', '.join(PRESETS)}) nor a config .toml file")
    tree = load_toml(path)
    return "tiny", [f"{k}={toml_literal(v)}" for k, v in flatten(tree).items()]


def canonical_sets(cfg: Config, preset: str) -> list[str]:
    """The `--set` pairs that turn the preset into `cfg` (seed left out: it is the run's own), sorted by key."""
    have, want = flatten(resolve(preset).model_dump()), flatten(cfg.model_dump())
    out = []
    for key, value in sorted(want.items()):
        if key == "seed" or (key in have and have[key] == value):
            continue
        if value is None:
            raise GlasslabError(f"config key '{key}' would be unset (None), which --set cannot express: set a value")
        out.append(f"{key}={toml_literal(value)}")
    if missing := sorted(set(have) - set(want)):
        raise GlasslabError(f"the base drops config key '{missing[0]}' of preset {preset}: keep the table's keys")
    if resolve(preset, None, out).model_dump() | {"seed": cfg.seed} != cfg.model_dump():
        raise GlasslabError("this config cannot be expressed as --set overrides of its preset: simplify the base")
    return out


def config_changes(a: Config, b: Config) -> dict[str, list[Any]]:
    fa, fb = flatten(a.model_dump()), flatten(b.model_dump())
    return {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def refusal_of(changes: dict[str, list[Any]], stages: list[str], patched: bool) -> str | None:
    """Why a candidate is not an experiment: it changes only the seed (a different sample of the same recipe,
    which is what the seeds already measure), or nothing the stages read."""
    if patched:
        return None
    read = set().union(*(READS[s] for s in stages))
    real = [k for k in changes if k != "seed" and k.split(".")[0] in read]
    if real:
        return None
    if "seed" in changes:
        return "the candidate changes only the seed: that is noise, not a change (use --aa to measure noise)"
    if changes:
        return f"the candidate changes only {', '.join(changes)}, which stages {','.join(stages)} do not read"
    return "the candidate changes nothing: give --set overrides or a --patch"


def prepare(req: Request) -> Arms:
    """Validate everything before anything is created: stages, metric, seeds, budget, base, overrides."""
    if not req.stages or [s for s in PIPELINE if s in req.stages] != list(req.stages):
        raise GlasslabError(f"--stages {','.join(req.stages)}: give some of {','.join(PIPELINE)}, in that order")
    if req.seeds < 2:
        raise GlasslabError(f"--seeds {req.seeds}: an interval needs at least 2 seeds per arm, use --seeds 2 or more")
    if req.min_effect < 0:
        raise GlasslabError(f"--min-effect {req.min_effect} must be >= 0 (in the metric's units)")
    if not req.metric or any(c in req.metric for c in "*?["):
        raise GlasslabError(f"--metric '{req.metric}' must name one metric, e.g. val/bpb")
    if req.aa and (req.sets or req.patch):
        raise GlasslabError("--aa compares the baseline with itself: drop --set and --patch")
    if req.patch is not None and not Path(req.patch).is_file():
        raise GlasslabError(f"--patch '{req.patch}' not found: pass a unified diff file (git diff > change.diff)")
    preset, base_sets = base_layers(req.base)
    common = base_sets + list(req.base_sets) + budget_sets(req.budget, req.stages)
    baseline = resolve(preset, None, common)
    candidate = resolve(preset, None, common + list(req.sets))
    changes = config_changes(baseline, candidate)
    return Arms(
        req,
        preset,
        goal_of(req.metric, req.goal),
        metric_stage_of(req.metric, req.stages),
        baseline,
        candidate,
        canonical_sets(baseline, preset),
        canonical_sets(candidate, preset),
        changes,
        None if req.aa else refusal_of(changes, req.stages, req.patch is not None),
    )


def arm_id(cfg: Config, stages: list[str], code: str, extra: str = "") -> str:
    """A short hash of what decides a run's result, the seed excepted: config, stages, code (and `extra`, e.g. a
    nonce for runs that must not be shared)."""
    dump = cfg.model_dump()
    dump.pop("seed")
    dump["system"].pop("threads")  # set per worker by the executor
    key = json.dumps({"config": dump, "stages": stages, "code": code, "extra": extra}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]
