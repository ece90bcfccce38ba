"""Near copies across an exact-bytes split: which test images have one in train, their accuracy apart from the
rest's in every epoch of every trial, and the inflation with its interval in the report."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
import pytest

from pokestudy.data import load, pool, prepare
from pokestudy.study.record import TrialRecord
from pokestudy.study.spec import Study
from pokestudy.train import TrialConfig, run_trial
from tests.test_data import REUSED, _near_copy, _pictures

# The fixture's pictures that show one picture (REUSED, found by the crop matcher) and a re-encoded copy of one.
COPY = "Bulbasaur/copy.jpg"
SAME = [REUSED[0] | {COPY}, *REUSED[1:]]


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    """The fixture's 15 pictures and a cropped, rescaled, re-encoded copy of one of them."""
    root = _pictures(tmp_path / "pics", 5)
    _near_copy(root / "Bulbasaur" / "00000023.jpg", root / COPY)
    return root


def _paths(data, ds, split: str) -> list[str]:
    """The source path of each image of one split, found by its pixels."""
    return [ds.paths[next(i for i, other in enumerate(ds.images) if (other == image).all())]
            for image in data.sets[split][0]]


@pytest.mark.fast
def test_the_mask_marks_exactly_the_test_images_with_a_near_copy_in_train(copied: Path):
    ds = load(str(copied), 32)
    exact = pool(str(copied), 32, near_duplicates=0)
    marked = 0
    for seed in range(8):
        data = exact.split(seed)
        train = set(_paths(data, ds, "train"))
        expected = [any(path in group and train & (group - {path}) for group in SAME)
                    for path in _paths(data, ds, "test")]
        assert data.near_copy.tolist() == expected, f"split {seed}"
        marked += sum(expected)
    assert marked, "in some split a copy is tested while its original trains"
    assert exact.manifest["near_copies"]["rule"] == "10+crops", "marked by the folder's own matcher"
    assert pool(str(copied), 32, near_duplicates=10).copy_groups is not None, "the pHash alone lets crops straddle"
    grouped = prepare(str(copied), 32)  # the folder's default: every near copy on one side of the split
    assert grouped.near_copy is None and "near_copies" not in grouped.manifest
    cfg = TrialConfig(width=4, res=32, epochs=1, batch_size=8)
    assert not {"near_copy_acc", "far_acc", "near_copy_n"} & set(run_trial(cfg, grouped)["final"]), "absent, not 0"


def test_near_copy_accuracy_is_recorded_every_epoch_and_its_inflation_reported(copied: Path, tmp_path: Path):
    """Real trials of a study on an exact-bytes split, stored by the driver's store (as Ray's trials are: each
    trains on its replicate's split of the pool), then the report."""
    from pokestudy.report import build
    from pokestudy.study.record import StudyRecord, identity, now, provenance
    from pokestudy.study.store import Store, artifact_store, grid_distributions

    exact = pool(str(copied), 32, near_duplicates=0)
    both = [s for s in range(20) if 0 < int(exact.split(s).near_copy.sum()) < len(exact.split(s).near_copy)][:3]
    spec = Study.model_validate({"name": "copies", "question": "Do near copies inflate test accuracy?",
                                 "data": {"source": str(copied), "res": 32, "near_duplicates": 0},
                                 "factors": {"arch": ["cnn", "resnet"]}, "seeds": both,
                                 "fixed": {"width": 4, "epochs": 3, "batch_size": 8}})
    url = f"sqlite:///{tmp_path / 'pokestudy.db'}"
    record = StudyRecord(spec=spec.model_dump(mode="json"), identity=identity(spec, exact.manifest),
                         data=exact.manifest, provenance=provenance(exact.manifest, 1, now()))
    store, plan = Store(url, "copies", record, artifact_store(tmp_path)), spec.trials()
    for work in plan:
        store.start(work, grid_distributions(plan))
        summary = run_trial(TrialConfig.from_dict(work.settings), exact.split(work.split_seed),
                            on_epoch=lambda r, key=work.key: store.epoch(key, r))
        store.complete(work, summary)
    records = [TrialRecord.from_trial(t) for t in optuna.load_study(study_name="copies", storage=url).get_trials()]
    assert len(records) == 6
    for r in records:
        mask = exact.split(r.split_seed).near_copy
        assert r.final["near_copy_n"] == int(mask.sum())
        assert len(r.history["near_copy_acc"]) == len(r.history["far_acc"]) == r.epochs == 3, "every epoch"
        share = mask.float().mean().item()
        assert r.final["test_acc"] == pytest.approx(share * r.final["near_copy_acc"] + (1 - share) * r.final["far_acc"])

    build(url, "copies", tmp_path, ("md", "csv"), generator="pokestudy report --study copies")
    table = pd.read_csv(tmp_path / "copies" / "near_copies.csv").set_index("arch")
    for arch in ("cnn", "resnet"):
        mine = [r for r in records if r.condition["arch"] == arch]
        inflation = sum(r.final["near_copy_acc"] - r.final["far_acc"] for r in mine) / len(mine)
        assert table.loc[arch, "inflation_diff"] == pytest.approx(inflation, abs=1e-6), "reproducible from the study"
        assert table.loc[arch, "replicates"] == 3
        assert table.loc[arch, "inflation_lo"] <= inflation <= table.loc[arch, "inflation_hi"], "a t-interval"
    summary = (tmp_path / "copies" / "summary.md").read_text()
    section = summary[summary.index("## Near copies in the test set"):]
    assert "`10+crops`" in section and "inflation" in section and "lift" in section
    assert section.index("inflation") < section.index("## Figures")
