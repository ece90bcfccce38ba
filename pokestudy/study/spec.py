"""Study specs: plain YAML validated into typed models, expanded into a list of trials.

A spec names the data, the scientific factors (a full grid), the nuisance parameters (fixed
here, or tuned per condition), the fixed settings, the replicates and the resources per trial.
Every condition's settings are checked against `TrialConfig` at load time, so a typo fails
before Ray starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pokestudy import UserError
from pokestudy.data import MAX_RES, MIN_RES
from pokestudy.imports import code_digest, is_user_code
from pokestudy.train import MODEL_PREFIX, TrialConfig

STUDIES = resources.files("pokestudy") / "studies"  # shipped inside the package: works after `pip install .`
# `res` may be a factor (its levels at most `data.res`, the resolution images are decoded at), not a fixed setting
SETTINGS = set(TrialConfig.model_fields) - {"seed", "device"}
TUNING_SEEDS = 10_000  # tuning trials' seeds start here; replicates' stay below
Scalar = str | int | float | bool


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(Strict):
    source: str = "sprites"
    res: int = Field(64, ge=MIN_RES, le=MAX_RES)
    # resample: replicate r splits with seed split_seed + r, so the claims average over splits too (which images
    # are held out moves a test accuracy more than the initialisation does); fixed: every trial splits with
    # split_seed (a given test set). Trials of one replicate share its split either way, so pairs stay paired.
    split: Literal["resample", "fixed"] = "resample"
    split_seed: int = Field(0, ge=0)
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
    """Settings tuned per condition on validation accuracy, before the replicates are run. Tuning trials
    train with seeds of their own (`TUNING_SEEDS` on), on the base split, so no replicate is a tuning trial
    graded again; each condition's sampler has a seed derived from the condition (`sampler_seed`)."""

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


class Adaptive(Strict):
    """Replicates added where they decide claims: `min` first, then as many more, up to `max`, as the
    claims' variance in those first ones asks for (Stein's two-stage rule, `report.power.plan`)."""

    min: int = Field(3, ge=2)
    max: int = Field(ge=2)

    @model_validator(mode="after")
    def _ordered(self) -> "Adaptive":
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


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
    # the replicates: `replicates: N` (numbered 0..N-1), `replicates: {min, max}` (adaptive), or `seeds: [..]`
    # (the numbers themselves). A replicate's number seeds its initialisation, batch order and augmentation
    # draws, and, with `data.split: resample`, its split.
    replicates: int | Adaptive | None = None
    seeds: list[Annotated[int, Field(ge=0, lt=TUNING_SEEDS)]] = []
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
            if isinstance(levels, list) and _unknown([name]):
                raise ValueError(f"factor {name!r} given as a list must be a trial setting "
                                 f"({', '.join(sorted(SETTINGS))}) or a model's own (model.NAME); "
                                 "otherwise give named bundles of settings")
        return v

    @model_validator(mode="after")
    def _conditions_valid(self) -> "Study":
        if (self.replicates is None) == (not self.seeds):
            raise ValueError("give the replicates once: `replicates: 3`, `replicates: {min: 3, max: 10}` "
                             "or `seeds: [0, 1, 2]`")
        if isinstance(self.replicates, int) and not 1 <= self.replicates <= TUNING_SEEDS:
            raise ValueError(f"replicates: give 1 to {TUNING_SEEDS}")
        if isinstance(self.replicates, Adaptive) and self.replicates.max > TUNING_SEEDS:
            raise ValueError(f"replicates.max: at most {TUNING_SEEDS}")
        if "res" in self.fixed:
            raise ValueError(f"give the resolution as data.res (now {self.data.res}), or as a factor, not as fixed.res")
        if unknown := _unknown(self.fixed):
            raise ValueError(f"unknown fixed setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(SETTINGS))} and the model's own, model.NAME")
        tuned = set(self.nuisance.params) if self.nuisance else set()
        if _unknown(tuned):
            raise ValueError(f"unknown nuisance parameter(s) {', '.join(_unknown(tuned))}")
        if tuned & set(self.fixed):
            raise ValueError(f"{', '.join(sorted(tuned & set(self.fixed)))} is both fixed and tuned; keep one")
        concrete = self.with_precision("fp32")  # `precision: auto` is resolved when the study is created
        for cond in concrete.conditions():
            if (res := TrialConfig.from_dict(concrete.settings(cond)).res) > self.data.res:
                raise ValueError(f"a condition trains at res {res}, above data.res {self.data.res}: images are "
                                 f"decoded once at data.res and shrunk per trial, so set data.res: {res}")
        levels = self.levels()
        for c in self.report.contrasts:
            if c.factor not in levels or {c.level, c.reference} - set(levels[c.factor]):
                raise ValueError(f"report contrast {c.factor}={c.level} vs {c.reference} names no factor level "
                                 "of this study")
        for pair in self.report.interactions:
            if set(pair) - set(levels) or pair[0] == pair[1]:
                raise ValueError(f"report interaction {' x '.join(pair)} needs two different factors of this study")
        return self

    def check_models(self) -> "Study":
        """Build each condition's model once on a zero batch (`TrialConfig.check_model`): done when a spec is
        loaded, not when a stored one is read back for a report, which should not need the user's code."""
        concrete = self.with_precision("fp32")
        for cond in concrete.conditions():
            TrialConfig.from_dict(concrete.settings(cond)).check_model()
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

    @property
    def adaptive(self) -> Adaptive | None:
        return self.replicates if isinstance(self.replicates, Adaptive) else None

    def replicate_seeds(self, planned: int | None = None) -> list[int]:
        """The replicates to run: the spec's, or for an adaptive study the first `planned` (default: `min`)."""
        if self.seeds:
            return list(self.seeds)
        if self.adaptive:
            return list(range(min(planned or self.adaptive.min, self.adaptive.max)))
        return list(range(self.replicates))

    def split_seed(self, seed: int) -> int:
        """The split a replicate trains on."""
        return self.data.split_seed + seed if self.data.split == "resample" else self.data.split_seed

    def work(self, condition: dict[str, str], seed: int, key: str, extra: dict[str, Any] | None = None,
             budget: float = 1.0) -> "Work":
        """One trial of `condition` with `seed` on its replicate's split; `extra` settings override."""
        return Work(key=key, condition=condition, seed=seed, split_seed=self.split_seed(seed),
                    settings={**self.settings(condition, seed), **(extra or {})}, budget=budget)

    def trials(self, tuned: dict[str, dict[str, Any]] | None = None, planned: int | None = None) -> list["Work"]:
        """The replicates' trials, replicate by replicate (a run cut short by its budget leaves whole ones),
        and those of the budget check: after every replicate, or in an adaptive study right after its pilot,
        before the replicates the pilot planned (a budget too short blocks every label, and more replicates
        cannot lift that). `tuned` maps a condition id to its chosen nuisance values, `planned` is how many
        replicates an adaptive study runs (`replicate_seeds`)."""
        tuned = tuned or {}
        seeds = self.replicate_seeds(planned)
        out = [self.work(c, s, f"{condition_id(c)}/seed={s}", tuned.get(condition_id(c)))
               for s in seeds for c in self.conditions()]
        check = self.budget_check
        levels = self.levels()

        def order(w: Work) -> tuple[int, ...]:
            """Seed by seed, the first factor varying fastest: a check cut short by time still pairs
            conditions on every factor."""
            return (seeds.index(w.seed), *[levels[f].index(w.condition[f]) for f in reversed(list(levels))])

        longer = [replace(base, key=f"{base.key}/budget={check.factor:g}x", budget=check.factor,
                          settings={**base.settings,
                                    "epochs": round(TrialConfig.from_dict(base.settings).epochs * check.factor)})
                  for base in (sorted(out, key=order) if check else []) if base.seed in seeds[:check.seeds]]
        if not self.adaptive:
            return out + longer
        pilot = seeds[:self.adaptive.min]  # a check of a planned replicate waits for that replicate
        first = len(self.conditions()) * len(pilot)
        return (out[:first] + [w for w in longer if w.seed in pilot] + out[first:]
                + [w for w in longer if w.seed not in pilot])

    def tuning_work(self, condition: dict[str, str], number: int, params: dict[str, Any]) -> "Work":
        """Tuning trial `number` of a condition: a seed no replicate uses, on the base split."""
        return Work(key=f"{condition_id(condition)}/tune={number}", condition=condition, seed=TUNING_SEEDS + number,
                    split_seed=self.data.split_seed,
                    settings={**self.settings(condition, TUNING_SEEDS + number), **params})

    def design(self) -> dict[str, Any]:
        """The part of the spec that trial results depend on. Seeds may grow or shrink (each trial
        carries its own), and the question, resources and analysis do not change a trial's result.

        A builder of the user's (`arch: package.module:function`) is its code as well as its name: `code`
        holds a hash of the file that defines each one (`imports.code_digest`), so an edited builder makes a
        rerun a different experiment rather than a resume with two models. The built-ins and
        `torchvision:NAME` are pokestudy's and torchvision's versions (in the provenance), and a study that
        names no user builder has no `code`: its identity is what it was. A data function is not hashed:
        all it does to a trial is what it returns, and the data fingerprint hashes every pixel, label,
        class and group of that, so its code may be refactored without refusing a study of the same data."""
        out = self.model_dump(mode="json", include={"factors", "fixed", "nuisance"})
        archs = dict.fromkeys(str(self.settings(c).get("arch", "")) for c in self.conditions())
        if code := {a: code_digest(a) for a in archs if is_user_code(a)}:
            out["code"] = code
        return out

    def with_precision(self, chosen: str) -> "Study":
        """This study with `fixed.precision: auto` (or none given) resolved to `chosen`, unless a factor sets
        it. The runner resolves it once, when the study is created, so it is part of the identity and a
        resumed study keeps it on other hardware. fp32, TrialConfig's default, stays implicit: a study
        made before `precision` existed keeps its identity."""
        named = self.fixed.get("precision", "auto")
        chosen = chosen if named == "auto" else named  # a precision the spec names is kept, fp32 implicitly
        by_factor = any(f == "precision" if isinstance(levels, list) else any("precision" in b for b in levels.values())
                        for f, levels in self.factors.items())
        fixed = {k: v for k, v in self.fixed.items() if k != "precision"}
        if chosen != "fp32" and not by_factor:
            fixed["precision"] = chosen
        return self.model_copy(update={"fixed": fixed})


@dataclass(frozen=True)
class Work:
    """One trial to run: a stable key (condition + seed) lets reruns skip what is done."""

    key: str
    condition: dict[str, str]
    seed: int
    split_seed: int  # the split of the data it trains, validates and tests on
    settings: dict[str, Any]
    budget: float = 1.0  # the multiple of the study's budget it trains for (the budget check's trials: > 1)


def condition_id(condition: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in condition.items())


def tuning_study(study: str, condition: str) -> str:
    """The Optuna study that holds a condition's tuning trials (`condition` is its `condition_id`)."""
    return f"{study}.tune.{condition}"


def sampler_seed(condition: str) -> int:
    """A condition's own sampler seed (`condition` is its `condition_id`): reproducible, and different
    conditions start their search from different random points."""
    return int(digest(condition), 16) % 2**31


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
        return Study.model_validate(raw).check_models()
    except ValidationError as e:
        errors = e.errors()
        # a union (`replicates: 3` or `{min, max}`) fails once per form: the form that was tried matters
        err = next((x for x in errors if not x["type"].endswith("_type")), errors[0])
        where = ".".join(str(p) for p in err["loc"] if not _union_branch(str(p))) or "spec"
        raise UserError(f"{source}: {where}: {err['msg'].removeprefix('Value error, ')}") from None
    except UserError as e:  # a condition's settings, checked by TrialConfig
        raise UserError(f"{source}: {e}") from None


def _unknown(names) -> list[str]:
    """The names that are neither a trial setting nor one of a model's own settings (`model.NAME`)."""
    return sorted(n for n in names if n not in SETTINGS and not n.startswith(MODEL_PREFIX))


def _union_branch(part: str) -> bool:
    """Pydantic names the form of a union it tried (`int`, `Adaptive`, `function-after[…]`) in an error's
    location; the user wrote none of them."""
    return part[:1].isupper() or "[" in part or part in ("int", "str", "float", "bool")
