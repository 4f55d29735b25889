"""A study spec: a base recipe (preset + overrides), factors crossed as a grid, seeds, and what to measure.

Written in TOML; the built-in ones live in glasslab/study/builtin/. Example:

    name = "lr-sweep"
    preset = "smoke"
    stages = ["pretrain"]
    seeds = [0, 1]
    [overrides]
    train.steps = 200
    [[factors]]
    name = "lr"
    key = "train.lr"
    values = [1e-3, 3e-3, 1e-2]
    [[metrics]]
    name = "val/loss"
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from glasslab.errors import GlasslabError
from glasslab.track.layout import PIPELINE, PRETRAIN, RL, SFT
from glasslab.track.layout import PipelineStage as Stage

# Config sections each stage reads: a factor may not vary one that a shared (computed-once) stage reads.
STAGE_SECTIONS = {
    PRETRAIN: {"model", "tokenizer", "data", "train"},
    SFT: {"model", "tokenizer", "sft", "envs"},
    RL: set(),
}
DEFAULT = "default"  # a factor value meaning: whatever the base recipe says


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Factor(_Strict):
    name: str
    key: str  # dotted config key, as for --set
    values: list[Any] = Field(min_length=1)  # TOML values; "default" = the base recipe's value
    baseline: Any = None  # with more than two levels: compare every level to this one (else highest vs lowest)

    @model_validator(mode="after")
    def _baseline_is_a_level(self) -> Factor:
        if self.baseline is not None and self.baseline not in self.values:
            raise ValueError(
                f"baseline {self.baseline!r} of factor '{self.name}' is not one of its values {self.values}"
            )
        return self


class MetricSpec(_Strict):
    """One number per run: `reduce` over the steps of `stage`; a glob name combines its matches with `across`.
    With `log`, the number is log10 of that (for quantities spanning orders of magnitude, whose seeds are
    better averaged and compared on a log scale)."""

    name: str
    label: str | None = None
    stage: str | None = None  # default: the study's last stage
    # "recovery": steps from the window's start until the value is first below `threshold` (the window's length
    # when it never is), e.g. how long MoE load imbalance takes to settle after a data shift
    reduce: Literal["last", "max", "min", "mean", "recovery"] = "last"
    across: Literal["mean", "max", "min"] = "mean"
    log: bool = False
    window: tuple[float, float] | None = None  # only the steps in [from, to) x the stage's last step, e.g. (0.5, 1)
    threshold: float | None = None  # for reduce = "recovery"

    @model_validator(mode="after")
    def _recovery(self) -> MetricSpec:
        if (self.reduce == "recovery") != (self.threshold is not None):
            raise ValueError(f"metric '{self.name}': reduce = 'recovery' and a threshold go together")
        if self.window is not None and not 0 <= self.window[0] < self.window[1] <= 1:
            raise ValueError(f"metric '{self.name}': window {list(self.window)} must be fractions 0 <= from < to <= 1")
        return self

    @property
    def is_glob(self) -> bool:
        return any(c in self.name for c in "*?[")

    @property
    def title(self) -> str:
        if self.label:
            return self.label
        what = f"{self.across} of {self.name}" if self.is_glob else self.name
        what = what if self.reduce == "last" else f"{self.reduce} over steps of {what}"
        return f"log10 {what}" if self.log else what


class Sensitivity(_Strict):
    """Learning-rate sensitivity (Wortsman et al. 2023) of one metric along one factor."""

    factor: str
    metric: str  # a [[metrics]] title


class StudySpec(_Strict):
    name: str
    description: str = ""
    preset: str = "tiny"
    stages: list[Stage] = list(PIPELINE)
    shared_stages: list[Stage] = []  # a prefix of `stages` computed once, in a base run every study run starts from
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    base_seed: int | None = None  # the shared base run's seed (default: the first seed)
    overrides: dict[str, Any] = {}
    factors: list[Factor] = []
    metrics: list[MetricSpec] = Field(min_length=1)
    curves: list[str] = []  # metric names drawn over steps, mean over seeds per setting
    sensitivity: Sensitivity | None = None

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        if [s for s in PIPELINE if s in self.stages] != self.stages or not self.stages:
            raise ValueError(f"stages {self.stages} must be some of {list(PIPELINE)}, in that order")
        if self.shared_stages and (
            self.shared_stages != self.stages[: len(self.shared_stages)] or self.shared_stages == self.stages
        ):
            raise ValueError(f"shared_stages {self.shared_stages} must be a proper prefix of stages {self.stages}")
        names = [f.name for f in self.factors]
        if len(set(names)) != len(names):
            raise ValueError(f"factor names must be unique, got {names}")
        read_by_shared = set().union(*(STAGE_SECTIONS[s] for s in self.shared_stages))
        for f in self.factors:
            if f.key.split(".")[0] in read_by_shared:
                raise ValueError(
                    f"factor '{f.name}' varies {f.key}, which the shared stages {self.shared_stages} read: "
                    "vary it in every run instead (drop shared_stages)"
                )
        titles = [m.title for m in self.metrics]
        if len(set(titles)) != len(titles):
            raise ValueError(f"metric titles must be unique (give each a label), got {titles}")
        if self.sensitivity:
            if self.sensitivity.factor not in names:
                raise ValueError(f"sensitivity factor '{self.sensitivity.factor}' is not one of the factors {names}")
            if self.sensitivity.metric not in titles:
                raise ValueError(
                    f"sensitivity metric '{self.sensitivity.metric}' is not one of the metric titles {titles}"
                )
        return self

    def metric_stage(self, m: MetricSpec) -> str:
        return m.stage or self.stages[-1]


def builtin_names() -> list[str]:
    folder = resources.files("glasslab.study").joinpath("builtin")
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_spec(spec: str) -> StudySpec:
    """A path to a TOML file, or the name of a built-in study."""
    path = Path(spec)
    if path.suffix == ".toml" or path.is_file():
        if not path.is_file():
            raise GlasslabError(
                f"study spec '{spec}' not found: pass an existing .toml file or one of {', '.join(builtin_names())}"
            )
        text, origin = path.read_text(), str(path)
    elif spec in builtin_names():
        text, origin = (
            resources.files("glasslab.study").joinpath("builtin", f"{spec}.toml").read_text(),
            f"built-in {spec}",
        )
    else:
        near = difflib.get_close_matches(spec, builtin_names(), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise GlasslabError(f"unknown study '{spec}': {hint}give a .toml spec or one of {', '.join(builtin_names())}")
    try:
        return StudySpec.model_validate(tomllib.loads(text))
    except tomllib.TOMLDecodeError as e:
        raise GlasslabError(f"study spec {origin} is not valid TOML ({e}): fix the syntax") from None
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise GlasslabError(f"study spec {origin}: {where + ': ' if where else ''}{err['msg']}") from None
