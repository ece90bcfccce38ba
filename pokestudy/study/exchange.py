"""A study as a folder that travels: `export` copies a study, its tuning stages and every file attached to
them out of a storage; `import` copies them into another. What it is for: moving a laptop's study into a
cluster's PostgreSQL, or committing a reference study under `results/` so that a clone reports it and a
rerun continues it on another machine (each trial keeps its own record; the study keeps its identity).

The folder holds `study.journal.gz`, an Optuna journal (Optuna's own text format, read back with its
public `JournalStorage` and `copy_study`), and `artifacts/`, the attached files by artifact id.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import tempfile
from pathlib import Path

import optuna
from optuna.artifacts import get_all_artifact_meta
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from pokestudy import UserError
from pokestudy.study.spec import tuning_study
from pokestudy.study.store import artifact_store, check_writable, storage

JOURNAL = "study.journal.gz"
ARTIFACTS = "artifacts"


def export(url: str, name: str, results: Path, dest: Path) -> tuple[list[str], int]:
    """Write study `name` of `url` (and its tuning stages) to the folder `dest`, replacing what was there
    only once the new copy is whole; returns the studies written and how many attached files were missing
    from the artifact store of `results` (a folder moved without its `.artifacts`)."""
    names = studies(url, name)
    if not names:
        raise UserError(f"no study {name!r} in {url}; `pokestudy studies --storage {url}` lists them")
    dest.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        missing = _write(url, names, results, building)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            shutil.rmtree(old)
        building.rename(dest)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return names, missing


def import_(src: Path, url: str, results: Path) -> list[str]:
    """Copy the studies of the exported folder `src` into `url`, their files into the artifact store of
    `results`. Refuses (writing nothing) a study name the storage already holds; a copy that fails midway
    is removed again."""
    journal = src / JOURNAL
    if not journal.is_file():
        raise UserError(f"{src} is not an exported study (no {JOURNAL}); make one with `pokestudy export`")
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "journal.log"
        with gzip.open(journal) as packed, plain.open("wb") as out:
            shutil.copyfileobj(packed, out)
        source = JournalStorage(JournalFileBackend(str(plain)))
        names = [s.study_name for s in optuna.get_all_study_summaries(source, include_best_trial=False)]
        check_writable(results)  # the default storage lives in it, and the attached files go there
        target = storage(url)
        held = {s.study_name for s in optuna.get_all_study_summaries(target, include_best_trial=False)}
        if clash := sorted(held.intersection(names)):
            raise UserError(f"{url} already holds study {clash[0]!r}; import into another --storage, or keep the "
                            "stored one with `pokestudy run --restart` first")
        begun: list[str] = []
        try:
            for n in names:
                begun.append(n)  # before the copy: a copy that fails midway leaves a half study to remove
                optuna.copy_study(from_study_name=n, from_storage=source, to_storage=target)
        except BaseException:
            for n in begun:
                with contextlib.suppress(KeyError):  # the failed copy may not have created its study yet
                    optuna.delete_study(study_name=n, storage=target)
            raise
    store, files = artifact_store(results), src / ARTIFACTS
    for path in sorted(files.iterdir()) if files.is_dir() else []:
        with path.open("rb") as f:
            store.write(path.name, f)
    return names


def studies(url: str, name: str) -> list[str]:
    """`name` and its tuning stages, as stored in `url`."""
    return [s.study_name for s in optuna.get_all_study_summaries(storage(url), include_best_trial=False)
            if s.study_name == name or s.study_name.startswith(tuning_study(name, ""))]


def _write(url: str, names: list[str], results: Path, folder: Path) -> int:
    """The journal and the attached files of `names` into `folder`; returns how many files were missing."""
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "journal.log"
        journal = JournalStorage(JournalFileBackend(str(plain)))
        for n in names:
            optuna.copy_study(from_study_name=n, from_storage=storage(url), to_storage=journal)
        with plain.open("rb") as f, gzip.GzipFile(folder / JOURNAL, "wb", mtime=0) as out:
            shutil.copyfileobj(f, out)
    store, missing = artifact_store(results), 0
    (folder / ARTIFACTS).mkdir()
    for n in names:
        study = optuna.load_study(study_name=n, storage=storage(url))
        for owner in [study, *study.get_trials(deepcopy=False)]:
            for meta in get_all_artifact_meta(owner, storage=storage(url)):
                try:
                    reader = store.open_reader(meta.artifact_id)
                except ArtifactNotFound:
                    missing += 1
                    continue
                with reader, (folder / ARTIFACTS / meta.artifact_id).open("wb") as out:
                    shutil.copyfileobj(reader, out)
    return missing
