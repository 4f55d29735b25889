"""`glasslab tune`: a deterministic searcher that runs the agent loop without a language model.

Coordinate search: knobs in the spec's order, each knob's values in order; every candidate is one experiment
(the same rules of evidence, the same ledger) against the best configuration so far, and a change is adopted only
when the experiment keeps it (better on the screening seeds and again on fresh seeds). Passes over the knobs
repeat until a pass adopts nothing or the budget of experiments is spent. A value the current configuration
already has, or a change already judged against the same configuration, is skipped without spending an
experiment. Example spec:

    name = "lr-warmup"
    base = "tiny"
    stages = ["pretrain"]
    metric = "val/bpb"
    seeds = 3
    budget = "300steps"
    max_experiments = 10
    [[knobs]]
    key = "train.lr"
    values = [1e-3, 6e-3, 1e-2]
    [[knobs]]
    key = "train.warmup_steps"
    values = [10, 100]
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from glasslab.errors import GlasslabError
from glasslab.experiment.arms import Request, prepare
from glasslab.study.plan import config_value, toml_literal
from glasslab.track.layout import PRETRAIN


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Knob(_Strict):
    key: str
    values: list[Any] = Field(min_length=1)


class TuneSpec(_Strict):
    name: str
    base: str = "tiny"
    stages: list[str] = [PRETRAIN]
    metric: str = "val/bpb"
    goal: str = "auto"
    seeds: int = 3
    budget: str | None = None
    min_effect: float = 0.0
    max_experiments: int = Field(10, ge=1)
    knobs: list[Knob] = Field(min_length=1)


def load_tune_spec(path: Path) -> TuneSpec:
    path = Path(path)
    if not path.is_file():
        raise GlasslabError(f"tune spec '{path}' not found: pass a .toml file (see `glasslab tune --help`)")
    try:
        return TuneSpec.model_validate(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as e:
        raise GlasslabError(f"tune spec {path} is not valid TOML ({e}): fix the syntax") from None
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise GlasslabError(f"tune spec {path}: {where + ': ' if where else ''}{err['msg']}") from None


def _request(spec: TuneSpec, description: str, base_sets: list[str], sets: list[str]) -> Request:
    return Request(
        description=description,
        sets=sets,
        metric=spec.metric,
        goal=spec.goal,  # type: ignore[arg-type]
        seeds=spec.seeds,
        budget=spec.budget,
        base=spec.base,
        base_sets=base_sets,
        stages=list(spec.stages),
        min_effect=spec.min_effect,
    )


def tune(
    spec: TuneSpec,
    run: Callable[[Request], dict[str, Any]],
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Search with `run` (one experiment -> its ledger entry). Every candidate is validated before the first
    experiment starts, so a typo in the last knob does not waste the others' compute."""
    for knob in spec.knobs:
        for value in knob.values:
            prepare(_request(spec, "check", [], [f"{knob.key}={toml_literal(value)}"]))
    best: dict[str, Any] = {}  # key -> adopted value
    entries: list[dict[str, Any]] = []
    tried: set[tuple[str, ...]] = set()  # (change, *base) already judged: a later pass does not repeat it
    adopted_in_pass = True
    while adopted_in_pass and len(entries) < spec.max_experiments:
        adopted_in_pass = False
        for knob in spec.knobs:
            for value in knob.values:
                if len(entries) >= spec.max_experiments:
                    break
                base_sets = [f"{k}={toml_literal(v)}" for k, v in best.items()]
                current = config_value(current_config(spec, base_sets), knob.key)
                change = f"{knob.key}={toml_literal(value)}"
                if value == current or (change, *base_sets) in tried:
                    continue
                tried.add((change, *base_sets))
                report(f"experiment {len(entries) + 1}/{spec.max_experiments}: {change}")
                entry = run(_request(spec, f"tune {spec.name}: {change}", base_sets, [change]))
                entries.append(entry)
                report(f"{entry['decision']}: {entry['reason']}")
                if entry["decision"] == "kept":
                    best[knob.key] = value
                    adopted_in_pass = True
    kept = [e for e in entries if e["decision"] == "kept"]
    if kept:
        found = ", ".join(f"{k}={toml_literal(v)}" for k, v in best.items())
        evidence = kept[-1]["rounds"][-1]["judgement"]
        verdict = f"{found} beats the base at equal budget on fresh seeds: {evidence['reason']}"
    else:
        verdict = f"none of {len(entries)} experiments beat the base on fresh seeds"
    return {
        "tune": spec.name,
        "best_sets": [f"{k}={toml_literal(v)}" for k, v in best.items()],
        "improved": bool(kept),
        "verdict": verdict,
        "experiments": [
            {k: e.get(k) for k in ("id", "description", "decision", "verdict", "difference", "ci95", "p")}
            for e in entries
        ],
    }


def current_config(spec: TuneSpec, base_sets: list[str]) -> dict[str, Any]:
    """The configuration the next experiment starts from: the base with the changes adopted so far."""
    return prepare(_request(spec, "current", base_sets, [])).baseline.model_dump()
