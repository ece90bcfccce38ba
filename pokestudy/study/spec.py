"""Study specs: plain YAML validated into typed models, expanded into a list of trials.

A spec names the data, the scientific factors (a full grid), the nuisance parameters (fixed
here, or tuned per condition), the fixed settings, the seeds and the resources per trial.
Every condition's settings are checked against `TrialConfig` at load time, so a typo fails
before Ray starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pokestudy import UserError
from pokestudy.data import MAX_RES, MIN_RES
from pokestudy.train import TrialConfig

STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"
SETTINGS = {f.name for f in fields(TrialConfig)} - {"seed", "device", "res"}
Scalar = str | int | float | bool


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Strict):
    source: str = "sprites"
    res: int = Field(64, ge=MIN_RES, le=MAX_RES)
    split_seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if abs(sum(v) - 1) > 1e-6 or min(v) <= 0:
            raise ValueError("train/val/test fractions must be positive and sum to 1")
        return v


class Resources(Strict):
    cpus: float = Field(1, gt=0)
    gpus: float = Field(0, ge=0)
    retries: int = Field(1, ge=0)  # a trial whose worker dies is retried this many times, then FAIL


class Range(Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"bad range: need low < high (and low > 0 with log), got {self.low}..{self.high}")
        return self


class Nuisance(Strict):
    """Settings tuned per condition on validation accuracy, before the seeds are run."""

    params: dict[str, Range] = Field(min_length=1)
    trials: int = Field(8, ge=1)  # per condition
    sampler: Literal["tpe", "random"] = "tpe"
    asha_grace: int | None = Field(None, ge=1)  # epochs before ASHA may stop a weak trial; None: no ASHA


class Study(Strict):
    """One study: what question it answers, and exactly which trials answer it."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    question: str = ""
    data: DataSpec = DataSpec()
    factors: dict[str, list[Scalar] | dict[str, dict[str, Scalar]]]
    fixed: dict[str, Scalar] = {}
    nuisance: Nuisance | None = None
    seeds: list[int] = Field(min_length=1)
    objective: Literal["val_acc"] = "val_acc"
    resources: Resources = Resources()

    @field_validator("factors")
    @classmethod
    def _non_empty(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one factor is needed")
        for name, levels in v.items():
            if not levels:
                raise ValueError(f"factor {name!r} has no levels")
            if isinstance(levels, list) and name not in SETTINGS:
                raise ValueError(f"factor {name!r} given as a list must be a trial setting ({', '.join(sorted(SETTINGS))}); "
                                 "otherwise give named bundles of settings")
        return v

    @model_validator(mode="after")
    def _conditions_valid(self) -> "Study":
        unknown = set(self.fixed) - SETTINGS
        if unknown:
            raise ValueError(f"unknown fixed setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(SETTINGS))}")
        tuned = set(self.nuisance.params) if self.nuisance else set()
        if tuned - SETTINGS:
            raise ValueError(f"unknown nuisance parameter(s) {', '.join(sorted(tuned - SETTINGS))}")
        if tuned & set(self.fixed):
            raise ValueError(f"{', '.join(sorted(tuned & set(self.fixed)))} is both fixed and tuned; keep one")
        for cond in self.conditions():
            TrialConfig.from_dict(self.settings(cond))
        return self

    def conditions(self) -> list[dict[str, str]]:
        """The full grid: one dict {factor: level name} per condition."""
        names = [[str(level) for level in levels] for levels in self.factors.values()]
        return [dict(zip(self.factors, combo)) for combo in itertools.product(*names)]

    def settings(self, condition: dict[str, str], seed: int = 0) -> dict[str, Any]:
        """TrialConfig settings for one condition and seed: fixed, then each factor's level."""
        out: dict[str, Any] = {**self.fixed, "res": self.data.res, "seed": seed}
        for factor, level in condition.items():
            levels = self.factors[factor]
            if isinstance(levels, dict):
                out.update(levels[level])
            else:
                out[factor] = next(v for v in levels if str(v) == level)
        return out

    def trials(self, tuned: dict[str, dict[str, Any]] | None = None) -> list["Work"]:
        """The seeded trials; `tuned` maps a condition id to its chosen nuisance values."""
        tuned = tuned or {}
        return [Work(key=f"{condition_id(c)}/seed={s}", condition=c, seed=s,
                     settings={**self.settings(c, s), **tuned.get(condition_id(c), {})})
                for c in self.conditions() for s in self.seeds]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Work:
    """One trial to run: a stable key (condition + seed) lets reruns skip what is done."""

    key: str
    condition: dict[str, str]
    seed: int
    settings: dict[str, Any]


def condition_id(condition: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in condition.items())


def available() -> list[Path]:
    return sorted(STUDIES_DIR.glob("*.yaml"))


def load(name_or_path: str) -> Study:
    """A spec by name (studies/NAME.yaml) or by path; every problem becomes one readable line."""
    path = Path(name_or_path)
    if not path.suffix:
        path = STUDIES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        names = ", ".join(p.stem for p in available())
        raise UserError(f"no study {name_or_path!r}; choose one of {names} or give a path to a .yaml spec")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path.name}: YAML syntax error{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path.name}: a study spec must be a YAML mapping")
    try:
        return Study.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise UserError(f"{path.name}: {where}: {err['msg']}") from None
