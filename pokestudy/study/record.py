"""The one shape in which trials and studies live in Optuna: the store writes these records, the
report reads them back. A field that is missing or renamed fails loudly here, never as a silent
default somewhere downstream.

A study's *identity* is what its trials' results depend on: the design part of the spec
(factors, fixed settings, nuisance search) and the data (content fingerprint, resolution,
split). Trials carry the identity they ran under; a rerun resumes only trials of the same
identity, and a report reads only those.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import optuna

from pokestudy import UserError, __version__
from pokestudy.data import near
from pokestudy.study.spec import Study, condition_id, digest
from pokestudy.train import TrialConfig, native_bf16

PACKAGES = ("torch", "torchvision", "ray", "optuna", "optuna-dashboard")


class RecordError(UserError):
    """A stored trial or study lacks a field this pokestudy needs (written by another version?)."""


def _read(cls: type, attrs: dict[str, Any], where: str) -> Any:
    """A record from stored attributes; only fields with a default (what older versions did not store, and
    the default says what they did) may be missing."""
    missing = [f.name for f in fields(cls)
               if f.name not in attrs and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise RecordError(f"{where} has no {', '.join(missing)} (stored by another pokestudy version?); "
                          "rerun the study with --restart to record it afresh")
    return cls(**{f.name: attrs[f.name] for f in fields(cls) if f.name in attrs})


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial. Kept whole in one trial system attribute, which optuna-dashboard does not
    send with every page; the user attributes get a short `display()` view of it instead."""

    key: str  # condition + seed (or + tuning number): what a rerun matches on
    identity: str  # digest of the study identity it ran under
    condition: dict[str, str]  # factor -> level name
    seed: int
    settings: dict[str, Any]  # the TrialConfig it ran with
    budget: float  # the multiple of the study's budget it trained for: 1, or the budget check's factor
    converged: bool  # the finished curve was flat over the last quarter of the budget (`train.settled`)
    epochs: int
    best_epoch: int  # the epoch of the best validation accuracy
    seconds: float
    images_per_s: float
    final: dict[str, float]  # metrics at the last epoch: train_acc, val_acc, test_acc, gap, <extra>_acc, …
    history: dict[str, list[float]]  # accuracies, gaps and learning rate, per epoch
    split_seed: int | None = None  # the split it ran on; None: stored before splits were resampled, the study's
    # Where it ran (None: stored before this was recorded): the Ray node, the device torch trained on, the GPUs
    # Ray assigned it (CUDA_VISIBLE_DEVICES; "" none), and whether it fell back to the CPU for want of a CUDA
    # that torch could see although a GPU was assigned
    node_id: str | None = None
    node_ip: str | None = None
    hostname: str | None = None
    device: str | None = None
    assigned_gpus: str | None = None
    cpu_fallback: bool | None = None
    cpu: str | None = None  # the trial's CPU model: a study continued elsewhere (`pokestudy import`) mixes machines

    ATTR: ClassVar[str] = "pokestudy:record"
    PLACEMENT: ClassVar[tuple[str, ...]] = ("node_id", "node_ip", "hostname", "device", "assigned_gpus",
                                           "cpu_fallback", "cpu")

    @classmethod
    def from_trial(cls, trial: optuna.trial.FrozenTrial) -> "TrialRecord":
        where = f"trial {trial.number}"
        if cls.ATTR not in trial.system_attrs:
            raise RecordError(f"{where} has no pokestudy record (stored by another pokestudy version?); "
                              "rerun the study with --restart to record it afresh")
        return _read(cls, trial.system_attrs[cls.ATTR], where)

    def attrs(self) -> dict[str, Any]:
        return asdict(self)

    def note(self, fixed: dict[str, Any]) -> str:
        """The trial's page in optuna-dashboard: what it is, what its condition sets beyond the study's
        `fixed` settings, and every epoch's accuracy and gap in % (a fixed-width block: compact, and
        aligned by any Markdown renderer)."""
        own = {k: v for k, v in self.settings.items() if k not in (*fixed, *self.condition, "seed", "res")}
        columns = ["lr", *[k for k in self.history if k.endswith(("_acc", "gap")) and not k.endswith("augmented")]]
        budget = f" at {self.budget:g}× the study's budget" if self.budget != 1 else ""
        split = "" if self.split_seed is None else f", split {self.split_seed}"
        names = [c.removesuffix("_acc") for c in columns]
        width = max(7, *map(len, names))

        def row(cells: list[str]) -> str:
            return " ".join(f"{c:>{width}}" for c in cells)

        rows = [row([str(e + 1), *(f"{self.history[c][e]:.0e}" if c == "lr" else f"{100 * self.history[c][e]:.1f}"
                                   for c in columns)]) for e in range(self.epochs)]
        rises = ", ".join(f"{k.removesuffix('_acc_rise')} {100 * self.final[k]:+.1f}" for k in ("train_acc_rise",
                                                                                                "val_acc_rise"))
        state = (f"converged (last-quarter rise: {rises} points)" if self.converged
                 else f"NOT converged: the budget was too short (last-quarter rise: {rises} points)")
        return "\n".join([
            f"**{', '.join(f'{k}={v}' for k, v in self.condition.items())}**, seed {self.seed}{split}{budget}: "
            f"{self.epochs} epochs ({self.seconds:.0f} s), {state}", "",
            "Settings of this condition (beyond the study's fixed ones): "
            + (", ".join(f"{k}={v}" for k, v in own.items()) or "none"), "",
            "Accuracy and gap in % per epoch:", "", "```", row(["epoch", *names]), *rows, "```"])

    def display(self) -> dict[str, Any]:
        """What a person scanning trials in optuna-dashboard wants, each short enough for one line."""
        shown = {k: round(v, 4) for k, v in self.final.items() if k.endswith(("_acc", "gap")) and "augmented" not in k}
        return {"condition": condition_id(self.condition), "seed": self.seed, "split_seed": self.split_seed,
                "budget": self.budget,
                "converged": self.converged, "epochs": self.epochs, **shown}


@dataclass(frozen=True)
class Budget:
    """A run's `--budget`: its seconds, whether they ran out before every trial had started, and how many
    trials were then left."""

    seconds: float
    spent: bool
    left: int


@dataclass(frozen=True)
class Provenance:
    """Where and with what a study ran: versions, code revision, machine, data, times. The fields with a
    default are those older versions did not store; the default says what they did."""

    pokestudy: str
    git: dict[str, Any] | None  # {"commit", "modified"}; None: not run from a git checkout
    python: str
    packages: dict[str, str | None]
    cpu: str
    cores: int | None
    gpus: list[str]
    threads_per_trial: float
    data_fingerprint: str
    started: str
    finished: str | None  # None: not finished (interrupted, or stopped on its budget)
    # whether the CPU and GPU compute bf16 natively, which decides what `precision: auto` became
    native_bf16: dict[str, bool | None] | None = None
    precision: list[str] = field(default_factory=list)  # []: stored before precision was recorded (fp32 on CPUs)
    ray_cluster: dict[str, float] = field(default_factory=dict)
    budget: Budget | None = None  # the last run's --budget; None: it ran without one

    @classmethod
    def read(cls, attrs: dict[str, Any], where: str) -> "Provenance":
        p = _read(cls, attrs, f"{where}'s provenance")
        return replace(p, budget=_read(Budget, p.budget, f"{where}'s budget")) if isinstance(p.budget, dict) else p


@dataclass(frozen=True)
class StudyRecord:
    """What a study is: its spec, identity, data manifest and provenance (study user attributes)."""

    spec: dict[str, Any]
    identity: dict[str, Any]  # {"digest", "design", "data"}
    data: dict[str, Any]  # the data manifest: source, counts, skipped files, splits, fingerprint
    provenance: Provenance

    @classmethod
    def from_study(cls, study: optuna.Study) -> "StudyRecord":
        where = f"study {study.study_name!r}"
        record = _read(cls, study.user_attrs, where)
        return replace(record, provenance=Provenance.read(record.provenance, where))

    @property
    def study(self) -> Study:
        """The stored spec, validated again into its typed form. A spec stored before splits were resampled
        ran on one fixed split (today's default would misdescribe it)."""
        data = self.spec.get("data", {})
        return Study.model_validate({**self.spec, "data": {"split": "fixed", **data}})

    def attrs(self) -> dict[str, Any]:
        return asdict(self)


def identity(spec: Study, manifest: dict[str, Any]) -> dict[str, Any]:
    """The study identity for this spec on this data; `digest` compares two of them."""
    data = {"source": manifest["data"], "fingerprint": manifest["fingerprint"], "res": manifest["res"],
            "split_seed": manifest["split_seed"], "fractions": manifest["fractions"]}
    if spec.data.split == "resample":  # only then, so fixed-split studies keep the identity they had
        data["split"] = "resample"
    if "evals" in manifest:  # only when there are any, so studies without them keep their identity
        data["evals"] = {name: e["fingerprint"] for name, e in manifest["evals"].items()}
    if rule := manifest["near_duplicates"]["threshold"]:  # likewise: exact-bytes grouping is what older studies used
        data["near_duplicates"] = f"{rule}, matcher {near.MATCHER}" if near.parse_rule(rule).crops else rule
    same = {"design": spec.design(), "data": {k: v for k, v in data.items() if k != "source"}}
    return {"digest": digest(same), "design": spec.design(), "data": data}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two identities, in words: `fixed.epochs: 6 → 30`, `data: A → B`."""
    out = []
    o, n = old["data"], new["data"]
    if o["source"] != n["source"]:
        out.append(f"data: {o['source']} → {n['source']}")
    elif o["fingerprint"] != n["fingerprint"]:
        out.append(f"data files changed (fingerprint {o['fingerprint']} → {n['fingerprint']})")
    # the optional ones: older identities lack them
    keys = ("res", "split", "split_seed", "fractions", "evals", "near_duplicates")
    out += [f"data.{k}: {o.get(k, '(none)')} → {n.get(k, '(none)')}" for k in keys if o.get(k) != n.get(k)]
    flat_old, flat_new = _flatten(old["design"]), _flatten(new["design"])
    for k in sorted(set(flat_old) | set(flat_new)):
        if flat_old.get(k, "(none)") != flat_new.get(k, "(none)"):
            out.append(f"{k}: {flat_old.get(k, '(none)')} → {flat_new.get(k, '(none)')}")
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def provenance(manifest: dict[str, Any], threads_per_trial: float, started: str,
               cluster: dict[str, float] | None = None, precisions: list[str] | None = None) -> Provenance:
    """This machine's provenance for a study on `manifest`'s data, started at `started`."""
    import torch

    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return Provenance(
        pokestudy=__version__, git=_git(), python=platform.python_version(),
        packages={p: _version(p) for p in PACKAGES}, cpu=cpu_model(), cores=os.cpu_count(), gpus=gpus,
        threads_per_trial=threads_per_trial, data_fingerprint=manifest["fingerprint"], started=started,
        finished=None, native_bf16={"cpu": native_bf16("cpu"), "gpu": native_bf16("cuda") if gpus else None},
        precision=precisions or [], ray_cluster=cluster or {})


def precisions(spec: Study) -> list[str]:
    """The precisions a (resolved) study's trials train in: one, or the levels of a `precision` factor."""
    return sorted({TrialConfig.from_dict(spec.settings(c)).precision for c in spec.conditions()})


def provenance_line(p: Provenance) -> str:
    """One line of provenance, for `pokestudy studies` and summary.md."""
    code = f"pokestudy {p.pokestudy}" + (f" @ {p.git['commit'][:10]}{' (modified)' if p.git['modified'] else ''}"
                                         if p.git else "")
    gpus = f"{len(p.gpus)}× {p.gpus[0]}" if p.gpus else "no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in p.packages.items())
    return (f"{code}; Python {p.python}, {versions}; {p.cpu} ({p.cores} cores), {gpus}, "
            f"{p.threads_per_trial:g} threads per trial{_precision_words(p)}; data {p.data_fingerprint}; "
            f"started {p.started}, finished {p.finished or '(not yet)'}")


def _precision_words(p: Provenance) -> str:
    """`, precision bf16 (native bf16: CPU yes, GPU yes)`; nothing for a study stored before precision
    was recorded (it trained in fp32 on CPUs, with bf16 autocast on GPUs)."""
    if not p.precision:
        return ""
    native = p.native_bf16
    where = [f"CPU {'yes' if native['cpu'] else 'no'}"] + ([] if native["gpu"] is None else
                                                         [f"GPU {'yes' if native['gpu'] else 'no'}"])
    return f", precision {' and '.join(p.precision)} (native bf16: {', '.join(where)})"


def _git() -> dict[str, Any] | None:
    """The commit and whether the tree was modified, when pokestudy runs from a git checkout."""
    here = Path(__file__).resolve().parents[1]  # the package's own folder
    try:  # tracked, not merely inside a work tree: a venv inside a checkout is ignored by git
        tracked = subprocess.run(["git", "-C", str(here), "ls-files", "--error-unmatch", "__init__.py"],
                                 capture_output=True, text=True, timeout=10)
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if tracked.returncode != 0 or commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "modified": bool(status.stdout.strip())}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
