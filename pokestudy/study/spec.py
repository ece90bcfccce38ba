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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pokestudy import UserError
from pokestudy.data import MAX_RES, MIN_RES
from pokestudy.train import TrialConfig

STUDIES = resources.files("pokestudy") / "studies"  # shipped inside the package: works after `pip install .`
SETTINGS = set(TrialConfig.model_fields) - {"seed", "device", "res"}
Scalar = str | int | float | bool


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Strict):
    source: str = "sprites"
    res: int = Field(64, ge=MIN_RES, le=MAX_RES)
    split_seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    eval: dict[str, str] = {}  # outside evaluation sets: {name: folder in the ImageFolder layout}
    # images whose perceptual hashes differ in at most BITS of 64 share a group (never straddle a split), and
    # with `BITS+crops` also those the crop matcher finds; 0: exact bytes only; None: the source's default
    # (10+crops for folders, 0 for sprites and synthetic). See `pokestudy.data.near.parse_rule`.
    near_duplicates: int | str | None = None

    @field_validator("near_duplicates")
    @classmethod
    def _a_rule(cls, v: int | str | None) -> int | str | None:
        from pokestudy.data.near import parse_rule

        try:
            return None if v is None else parse_rule(v).value
        except UserError as e:
            raise ValueError(str(e)) from None

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


class Reference(Strict):
    """A published result to draw beside ours, e.g. the student report's single run."""

    label: str
    train_acc: float = Field(ge=0, le=1)
    test_acc: float = Field(ge=0, le=1)


class Contrast(Strict):
    """A comparison of two levels of one factor, beyond the main effects (each level vs the first)."""

    factor: str
    level: str
    reference: str


class BudgetCheck(Strict):
    """Is the budget enough? The first `seeds` seeds of every condition run again at `factor` times the
    epochs (the same schedule, stretched); a claim whose label differs between the two budgets is
    reported *budget-dependent*. Adds trials, changes none, so it is not part of the identity."""

    factor: float = Field(2.0, gt=1)
    seeds: int | None = Field(None, ge=1)  # how many of the study's seeds, the first ones; None: all
    pilot: str | None = None  # the study that chose the budget (an `epochs` factor): the report shows its curve


class ReportSpec(Strict):
    """What the report analyses: the family of claims (every main effect, plus these contrasts and
    interactions), the equivalence margin and an optional reference result. Changing it changes no
    trial's result, so it is not part of the study's identity."""

    delta: float = Field(2.0, gt=0)  # equivalence margin, in accuracy points
    reference: Reference | None = None
    contrasts: list[Contrast] = []
    interactions: list[tuple[str, str]] = []


class Study(Strict):
    """One study: what question it answers, and exactly which trials answer it."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    question: str = ""
    data: DataSpec = DataSpec()
    factors: dict[str, list[Scalar] | dict[str, dict[str, Scalar]]]
    fixed: dict[str, Scalar] = {}
    nuisance: Nuisance | None = None
    seeds: list[int] = Field(min_length=1)
    budget_check: BudgetCheck | None = None
    resources: Resources = Resources()
    report: ReportSpec = ReportSpec()

    @field_validator("factors")
    @classmethod
    def _non_empty(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one factor is needed")
        for name, levels in v.items():
            if not levels:
                raise ValueError(f"factor {name!r} has no levels")
            if isinstance(levels, list) and name not in SETTINGS:
                raise ValueError(f"factor {name!r} given as a list must be a trial setting "
                                 f"({', '.join(sorted(SETTINGS))}); "
                                 "otherwise give named bundles of settings")
        return v

    @model_validator(mode="after")
    def _conditions_valid(self) -> "Study":
        unknown = set(self.fixed) - SETTINGS
        if unknown:
            raise ValueError(f"unknown fixed setting(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(SETTINGS))}")
        tuned = set(self.nuisance.params) if self.nuisance else set()
        if tuned - SETTINGS:
            raise ValueError(f"unknown nuisance parameter(s) {', '.join(sorted(tuned - SETTINGS))}")
        if tuned & set(self.fixed):
            raise ValueError(f"{', '.join(sorted(tuned & set(self.fixed)))} is both fixed and tuned; keep one")
        for cond in self.conditions():
            TrialConfig.from_dict(self.settings(cond))
        levels = self.levels()
        for c in self.report.contrasts:
            if c.factor not in levels or {c.level, c.reference} - set(levels[c.factor]):
                raise ValueError(f"report contrast {c.factor}={c.level} vs {c.reference} names no factor level "
                                 "of this study")
        for pair in self.report.interactions:
            if set(pair) - set(levels) or pair[0] == pair[1]:
                raise ValueError(f"report interaction {' x '.join(pair)} needs two different factors of this study")
        return self

    def levels(self) -> dict[str, list[str]]:
        """Each factor's level names, in the spec's order (the first is the reference)."""
        return {f: [str(level) for level in levels] for f, levels in self.factors.items()}

    def conditions(self) -> list[dict[str, str]]:
        """The full grid: one dict {factor: level name} per condition."""
        return [dict(zip(self.factors, combo)) for combo in itertools.product(*self.levels().values())]

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
        """The seeded trials, then those of the budget check; `tuned` maps a condition id to its chosen
        nuisance values."""
        tuned = tuned or {}
        out = []
        for c in self.conditions():
            for s in self.seeds:
                out.append(Work(key=f"{condition_id(c)}/seed={s}", condition=c, seed=s,
                                settings={**self.settings(c, s), **tuned.get(condition_id(c), {})}))
        check = self.budget_check
        levels = self.levels()

        def order(w: Work) -> tuple[int, ...]:
            """Seed by seed, the first factor varying fastest: a check cut short by time still pairs
            conditions on every factor."""
            return (self.seeds.index(w.seed), *[levels[f].index(w.condition[f]) for f in reversed(list(levels))])

        for base in (sorted(out, key=order) if check else []):
            if base.seed in self.seeds[:check.seeds]:
                epochs = round(TrialConfig.from_dict(base.settings).epochs * check.factor)
                out.append(Work(key=f"{base.key}/budget={check.factor:g}x", condition=base.condition, seed=base.seed,
                                settings={**base.settings, "epochs": epochs}, budget=check.factor))
        return out

    def design(self) -> dict[str, Any]:
        """The part of the spec that trial results depend on. Seeds may grow or shrink (each trial
        carries its own), and the question, resources and analysis do not change a trial's result."""
        return self.model_dump(mode="json", include={"factors", "fixed", "nuisance"})


@dataclass(frozen=True)
class Work:
    """One trial to run: a stable key (condition + seed) lets reruns skip what is done."""

    key: str
    condition: dict[str, str]
    seed: int
    settings: dict[str, Any]
    budget: float = 1.0  # the multiple of the study's budget it trains for (the budget check's trials: > 1)


def condition_id(condition: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in condition.items())


def tuning_study(study: str, condition: str) -> str:
    """The Optuna study that holds a condition's tuning trials (`condition` is its `condition_id`)."""
    return f"{study}.tune.{condition}"


def digest(value: Any) -> str:
    """A short stable hash of any JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def available() -> dict[str, str]:
    """{name: YAML text} of the specs shipped with the package."""
    return {p.name.removesuffix(".yaml"): p.read_text() for p in sorted(STUDIES.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")}


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load(name_or_path: str) -> Study:
    """A spec by name (a shipped study) or by path; every problem becomes one readable line."""
    path = Path(name_or_path)
    shipped = available()
    if not path.suffix and name_or_path in shipped:
        return parse(shipped[name_or_path], f"{name_or_path}.yaml")
    if not path.is_file():
        raise UserError(f"no study {name_or_path!r}; choose one of {', '.join(shipped)} or give a path to a .yaml spec")
    return parse(path.read_text(), path.name)


def parse(text: str, source: str) -> Study:
    """Validate a spec's YAML text; `source` names it in error messages."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 — a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", e)
        kind = "" if str(problem).startswith("duplicate key") else "YAML syntax error: "
        raise UserError(f"{source}{where}: {kind}{problem}"
                        + ("; keep one of them" if not kind else "")) from None
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a study spec must be a YAML mapping")
    try:
        return Study.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        raise UserError(f"{source}: {where}: {err['msg']}") from None
