"""The Python API, which `pokestudy run` uses too: load a study, run it, read its results as DataFrames.

    import pokestudy
    study = pokestudy.load_study("smoke")  # a shipped study's name, or a path to a spec
    done = pokestudy.run(study, results="results")  # resumes; refuses another experiment under the name
    done.verdicts  # the same numbers as results/smoke/verdicts.csv
    pokestudy.results("smoke").conditions  # later, from the storage alone: results/smoke/gap.csv

A user mistake raises `pokestudy.UserError`, whose message is the line the command line prints.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pokestudy import imports

if TYPE_CHECKING:
    from pokestudy.report import Analysed
    from pokestudy.study.spec import Study

FORMATS = ("csv", "md", "tex", "json")


class NothingFinished(Exception):
    """A run in which no trial finished: nothing to report (each trial's error is in the storage)."""


@dataclass(frozen=True)
class Results:
    """A study's results, read from its storage; the numbers its files in `results/NAME/` hold."""

    name: str
    trials: pd.DataFrame  # one row per finished trial: factors, seed, final metrics, settings, history
    conditions: pd.DataFrame  # one row per condition: means and intervals (gap.csv)
    verdicts: pd.DataFrame  # one row per claim: its label and intervals (verdicts.csv)


def storage_url(storage: str | None, results: str | Path) -> str:
    """`storage`, else the SQLite file `results/pokestudy.db`."""
    return storage or f"sqlite:///{(Path(results) / 'pokestudy.db').as_posix()}"


def load_study(path_or_name: str) -> Study:
    """A spec by a shipped study's name or by path, validated (its archs built once on a zero batch)."""
    from pokestudy.study import spec

    return spec.load(path_or_name)


def run(study: Study | str, *, storage: str | None = None, results: str | Path = "results",
        budget: float | None = None, study_name: str | None = None, data: str | None = None,
        generator: str | None = None, **options: Any) -> Results:
    """Run every trial of `study` not yet finished in `storage`, write its report to `results/NAME/`, and
    return its results. `budget`: seconds of wall clock (start no trial that cannot finish in it);
    `options`: the rest of `pokestudy run`'s (evals, near_duplicates, address, max_concurrent,
    gpus_per_trial, restart, verbose)."""
    from optuna.trial import TrialState

    from pokestudy.study import runner

    study = load_study(study) if isinstance(study, str) else study
    if line := imports.notice(study, data):
        print(line, file=sys.stderr)
    url, out = storage_url(storage, results), Path(results)
    stored = runner.run_study(study, storage=url, results=out, study_name=study_name or study.name, data=data,
                              budget=budget, trial_figure=_trial_figure, **options)
    if not stored.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise NothingFinished(f"no trial of {stored.study_name} finished; their errors are in the storage "
                              "(`pokestudy dashboard`)")
    from pokestudy.report import build  # matplotlib and friends: imported after the trials, not before

    done = build(url, stored.study_name, out, FORMATS, generator=generator or f"pokestudy.run({study.name!r})")
    return _frames(stored.study_name, done)


def results(name: str, *, storage: str | None = None, results: str | Path = "results") -> Results:
    """The results of study `name` as its storage holds them (finished trials of its identity only)."""
    from pokestudy.report import analyse

    return _frames(name, analyse(storage_url(storage, results), name))


def export_study(name: str, dest: str | Path | None = None, *, storage: str | None = None,
                 results: str | Path = "results") -> Path:
    """Copy study `name` (its tuning stages, every trial, the files attached) into a folder, by default
    `results/NAME/archive`, that `import_study` reads into any other storage; returns the folder."""
    from pokestudy.study import exchange

    folder = Path(dest) if dest is not None else Path(results) / name / "archive"
    names, missing = exchange.export(storage_url(storage, results), name, Path(results), folder)
    lost = f"; {missing} attached files were missing from {Path(results) / '.artifacts'}" if missing else ""
    print(f"exported {', '.join(names)} to {folder}{lost}", file=sys.stderr)
    return folder


def import_study(src: str | Path, *, storage: str | None = None, results: str | Path = "results") -> list[str]:
    """Copy an exported study folder into `storage`: a rerun of its spec there continues it, a report
    reads it; returns the study names imported."""
    from pokestudy.study import exchange

    url = storage_url(storage, results)
    names = exchange.import_(Path(src), url, Path(results))
    print(f"imported {', '.join(names)} into {url}", file=sys.stderr)
    return names


def _frames(name: str, done: Analysed) -> Results:
    from pokestudy.report.tables import public

    return Results(name, public(done.everything.frame), public(done.table), public(done.claims))


def _trial_figure(record, path: Path) -> Path:
    """The report's per-trial figure, imported only when the first trial finishes (matplotlib is slow to load)."""
    from pokestudy.report import trial_figure

    return trial_figure(record, path)
