"""Decide which trials of a study to run, and refuse to answer for a different experiment.

The storage is the memory: a trial is done when a COMPLETE trial of the same key *and identity*
is stored, so a rerun resumes without Ray state. A stored study whose identity (design or data)
differs from this run is refused before anything is written; `restart` archives it first.
Ray itself lives in `raytune`.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pokestudy import UserError
from pokestudy.data import pool
from pokestudy.study import record as records
from pokestudy.study.raytune import Clock, Driver, Progress, Slot, check_address, tuning_slots
from pokestudy.study.spec import Study, Work, condition_id, sampler_seed, tuning_study
from pokestudy.study.store import (Store, TrialFigure, archive, artifact_store, check_writable, find_study, finished,
                                   grid_distributions, storage as open_storage)
from pokestudy.train import default_precision


def run_study(spec: Study, *, storage: str, results: Path, study_name: str, data: str | None = None,
              evals: dict[str, str] | None = None, near_duplicates: int | None = None,
              address: str | None = None, max_concurrent: int | None = None, gpus_per_trial: float | None = None,
              restart: bool = False, verbose: bool = False, trial_figure: TrialFigure | None = None,
              budget: float | None = None) -> optuna.Study:
    """Run every trial of `spec` not yet COMPLETE in the storage; returns the Optuna study to report.

    Everything a user can get wrong (flags, results folder, storage URL, data, identity, Ray address, a
    trial larger than any Ray node) is checked before the first write to the storage. `trial_figure`,
    when given, draws each finished trial for its page in the dashboard. `budget` (seconds of wall
    clock from now) starts a trial only while the measured trial times say it can finish in it; the
    trials left wait for a rerun.
    """
    _check_limits(max_concurrent, gpus_per_trial, budget)
    clock = Clock(None if budget is None else time.time() + budget)
    check_writable(results)
    open_storage(storage)
    check_address(address)
    lock = _lock(results, f"{storage}|{study_name}")
    try:
        prepared = pool(data or spec.data.source, spec.data.res, spec.data.split_seed, spec.data.fractions,
                        {**spec.data.eval, **(evals or {})},
                        spec.data.near_duplicates if near_duplicates is None else near_duplicates)
        spec = spec.with_precision(_created_precision(spec, storage, study_name, restart, gpus_per_trial))
        identity = records.identity(spec, prepared.manifest)
        driver = Driver(spec, prepared, results, address, max_concurrent, gpus_per_trial, verbose)
        if restart:  # everything reruns: Ray (and whether its nodes can hold a trial) is checked before archiving
            driver.start_ray()
            if kept := archive(storage, study_name):  # the study, or only its tuning stage
                print(f"study {study_name}: kept the stored one as {kept}; starting over", file=sys.stderr)
        stored = find_study(storage, study_name)
        started = _check_identity(stored, identity, study_name)
        tuned = tuple(spec.nuisance.params) if spec.nuisance else ()

        def study_record() -> records.StudyRecord:
            """Made when the first write is due, once Ray runs (its cluster is part of the provenance)."""
            return records.StudyRecord(
                spec=spec.model_dump(mode="json"), identity=identity, data=prepared.manifest,
                provenance=records.provenance(prepared.manifest, spec.resources.cpus, started, driver.cluster(),
                                              records.precisions(spec)))

        best = (_tune_nuisance(driver, storage, study_name, identity, study_record, trial_figure, clock)
                if tuned else None)
        plan, final = _stage(spec, best, storage, study_name, identity["digest"])
        done = finished(storage, study_name, identity["digest"])
        todo = [w for w in plan if w.key not in done]
        if clock.refused:
            raise BudgetSpent(f"study {study_name}: budget spent while tuning; rerun with a larger --budget to "
                              "continue")
        if not todo and final:
            print(f"study {study_name} is already finished ({len(plan)} trials); re-exporting its results",
                  file=sys.stderr)
            return stored or optuna.load_study(study_name=study_name, storage=open_storage(storage))
        driver.start_ray()
        store = Store(storage, study_name, study_record(), artifact_store(results), trial_figure=trial_figure)
        stale = store.fail_stale()
        note = f", {stale} interrupted trial(s) will rerun" if stale else ""
        pilot = "" if final else f" (the first {spec.adaptive.min} replicates: the pilot that plans the rest)"
        print(f"study {study_name}: {len(plan)} trials{pilot}, {len(plan) - len(todo)} already done{note}",
              file=sys.stderr)
        for r in done.values():
            clock.record(r.condition, r.budget, r.seconds)
        while todo:
            driver.fit({w.key: store for w in todo}, Progress(len(plan), len(plan) - len(todo)), study_name,
                       [Slot(w.condition, w.budget, lambda w=w: w) for w in todo], clock,
                       distributions=grid_distributions(spec.trials(best, spec.adaptive.max if spec.adaptive
                                                                     else None), tuned), tuned=tuned)
            if final or clock.refused:
                break
            plan, final = _stage(spec, best, storage, study_name, identity["digest"])
            if not final:  # a pilot trial failed (its error is stored): planning needs the whole pilot
                print(f"study {study_name}: a pilot trial failed, so the rest cannot be planned; see its error "
                      "(`pokestudy dashboard`), then rerun to retry it", file=sys.stderr)
                break
            todo = [w for w in plan if w.key not in finished(storage, study_name, identity["digest"])]
            print(f"study {study_name}: the pilot's variance asks for {len({w.seed for w in plan})} replicates in "
                  f"all (at most {spec.adaptive.max}); {len(todo)} more trials", file=sys.stderr)
        if spec.adaptive and final:
            store.study.set_user_attr("replicates_planned", len({w.seed for w in plan}))
        if not final:  # what is left is the pilot's rest and every replicate it would plan, at least up to min
            plan = spec.trials(best)
        left = len(plan) - len(finished(storage, study_name, identity["digest"]).keys() & {w.key for w in plan})
        prov = replace(records.StudyRecord.from_study(store.study).provenance,  # this run's budget is the one
                       finished=None if clock.refused else records.now(),       # that counts, or none
                       budget=None if clock.deadline is None else records.Budget(budget, clock.refused, left))
        if clock.refused:
            print(f"study {study_name}: budget spent after {replicates_done(spec, store.study)} whole replicate(s), "
                  f"{left} trial(s) left; rerun with a larger --budget to continue", file=sys.stderr)
        store.study.set_user_attr("provenance", asdict(prov))
        return store.study
    finally:
        lock.close()


class BudgetSpent(Exception):
    """The wall-clock budget ran out before a trial of the study itself could start (while tuning)."""


def _stage(spec: Study, best: dict | None, storage: str, study_name: str,
           identity: str) -> tuple[list[Work], bool]:
    """The trials to run now, and whether they are all the study will run. An adaptive study runs its
    pilot (its first `min` replicates, without the budget check) first; once the pilot is done, the budget
    check and every replicate its variance asks for (`report.power.plan`: Stein's second stage)."""
    if not spec.adaptive:
        return spec.trials(best), True
    pilot = [w for w in spec.trials(best) if w.budget == 1]
    if not {w.key for w in pilot} <= finished(storage, study_name, identity).keys():
        return pilot, False
    return spec.trials(best, _planned(spec, find_study(storage, study_name))), True


def _planned(spec: Study, study: optuna.Study) -> int:
    """Stein's second stage: the replicates in all, from the pilot's per-replicate claim differences only."""
    from pokestudy.report import power, tables, verdicts

    df = tables.read(study).frame
    pilot = df[(df["budget"] == 1) & df["seed"].isin(spec.replicate_seeds())]
    analysis = verdicts.analyse(pilot, spec.report)
    return power.plan(analysis.differences.values(), spec.report.delta / 100, analysis.size, spec.adaptive.max)


def replicates_done(spec: Study, study: optuna.Study) -> int:
    """How many of the spec's replicates have every condition's trial at the study's budget COMPLETE."""
    keys = {t.user_attrs["key"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    works = [w for w in spec.trials(planned=spec.adaptive.max if spec.adaptive else None) if w.budget == 1]
    return sum(all(w.key in keys for w in works if w.seed == s) for s in {w.seed for w in works})


def _check_identity(stored: optuna.Study | None, identity: dict, name: str) -> str:
    """Refuse (before any write) a stored study of another identity; return when it was started."""
    if stored is None or not (stored.user_attrs or stored.trials):  # absent, or created by a run that died at once
        return records.now()
    try:
        old = records.StudyRecord.from_study(stored)
    except records.RecordError:
        raise UserError(f"study {name!r} in this storage has no pokestudy identity (another tool or an older "
                        "version made it); use --study-name NEW, or --restart to archive it and start over") from None
    if old.identity["digest"] != identity["digest"]:
        diff = "; ".join(records.differences(old.identity, identity)) or "the study identity"
        raise UserError(f"study {name!r} in this storage is a different experiment ({diff}); use --study-name NEW "
                        f"to keep both, or --restart to archive the stored one as {name}.archived-… and start over")
    return old.provenance.started


def _created_precision(spec: Study, storage: str, name: str, restart: bool, gpus: float | None) -> str:
    """What `precision: auto` is for this run: what the stored study (or its tuning stage) was created with
    (fp32 when its spec names none), else, for a new study or a restart, the default of the trials' device."""
    names = [name, *(tuning_study(name, condition_id(c)) for c in spec.conditions() if spec.nuisance)]
    for stored in (find_study(storage, n) for n in ([] if restart else names)):
        if stored is not None and "spec" in stored.user_attrs:
            fixed = stored.user_attrs["spec"]["fixed"]
            return fixed["precision"] if "precision" in fixed else "fp32"  # fp32 stays implicit (`with_precision`)
    trial_gpus = spec.resources.gpus if gpus is None else gpus
    return default_precision("cuda" if trial_gpus else "cpu")


def _tune_nuisance(driver: Driver, storage: str, study_name: str, identity: dict, study_record,
                   trial_figure: TrialFigure | None, clock: Clock) -> dict[str, dict]:
    """Stage 1: per condition, `trials` Optuna trials (TPE or random) on validation accuracy.

    Each condition has its own Optuna study, `<study>.tune.<condition>`, and its own Tune run, so
    the sampler models one condition at a time and ASHA compares a trial only with trials of its
    own condition (one scheduler across conditions stopped every slow-learning augmented trial at
    the first rung). Returns each condition's best nuisance values for the seeded stage.
    """
    spec = driver.spec
    names = {condition_id(c): tuning_study(study_name, condition_id(c)) for c in spec.conditions()}
    left: dict[str, int] = {}
    for cid, name in names.items():
        stored = find_study(storage, name)
        _check_identity(stored, identity, name)
        used = [] if stored is None else [t for t in stored.get_trials(deepcopy=False) if t.state in (
            TrialState.COMPLETE, TrialState.PRUNED) or "error" in t.user_attrs]  # interrupted ones run again
        left[cid] = spec.nuisance.trials - len(used)
    total = len(names) * spec.nuisance.trials
    if any(n > 0 for n in left.values()):
        driver.start_ray()
        record = study_record()
        print(f"study {study_name}: tuning {', '.join(spec.nuisance.params)} with {spec.nuisance.trials} trials "
              f"per condition, {total - sum(left.values())} already done", file=sys.stderr)
        progress = Progress(total, total - sum(left.values()))
        for index, condition in enumerate(spec.conditions()):
            cid = condition_id(condition)
            if left[cid] <= 0 or clock.refused:
                continue
            seed = sampler_seed(cid)
            sampler = (optuna.samplers.TPESampler(n_startup_trials=max(2, spec.nuisance.trials // 2), seed=seed)
                       if spec.nuisance.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed))
            store = Store(storage, names[cid], record, artifact_store(driver.results), sampler=sampler,
                          trial_figure=trial_figure)
            store.fail_stale()
            owner: dict[str, Store] = {}
            driver.fit(owner, progress, f"{study_name}-tune{index}",
                       tuning_slots(condition, left[cid], spec, store, owner), clock, tuning=True)
    if clock.refused:
        return {}
    best = {}
    for cid, name in names.items():
        study = find_study(storage, name)
        try:
            best[cid] = study.best_trial.params
        except (AttributeError, ValueError):
            raise UserError(f"no tuning trial of {cid} finished; `pokestudy dashboard` shows their errors") from None
    return best


def _lock(results: Path, study_key: str):
    """One driver per study: a second `pokestudy run` on the same study and storage refuses."""
    lock_dir = results / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    handle = open(lock_dir / f"{hashlib.sha256(study_key.encode()).hexdigest()[:16]}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError("another `pokestudy run` is already running this study on this storage; "
                        "wait for it, or watch it with `pokestudy dashboard`") from None
    return handle


def _check_limits(max_concurrent: int | None, gpus_per_trial: float | None, budget: float | None) -> None:
    """Ray takes a negative or NaN GPU count and waits forever, and `max_concurrent_trials=0` means no
    limit: refuse both, and a budget that is no time at all, before anything starts. (A count no node has
    is refused once Ray runs.)"""
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise UserError(f"--budget {budget:g} s: give a positive duration such as 90s, 45m or 2h")
    if max_concurrent is not None and max_concurrent < 1:
        raise UserError(f"--max-concurrent {max_concurrent}: give 1 or more (at most that many trials at once), "
                        "or leave it out to run as many as fit")
    if gpus_per_trial is not None and not (math.isfinite(gpus_per_trial) and gpus_per_trial >= 0
                                           and (gpus_per_trial <= 1 or gpus_per_trial.is_integer())):
        raise UserError(f"--gpus-per-trial {gpus_per_trial:g}: give 0 (CPU only), a fraction up to 1 (0.25: four "
                        "trials share a GPU) or a whole number of GPUs")
