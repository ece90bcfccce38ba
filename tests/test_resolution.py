"""Resolution as a factor: the data is decoded once, at `data.res`, and each trial trains on its own
level's images, area-averaged down from it."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import cli
from pokestudy.data import prepare
from pokestudy.study import spec
from pokestudy.study.record import TrialRecord

SPEC = {"name": "resolution-tiny", "question": "Does resolution move the gap?",
        "data": {"source": "synthetic:classes=4,per_class=12,size=64", "res": 64},
        "factors": {"res": [32, 64]}, "fixed": {"arch": "tests.my_models:sized", "epochs": 2, "batch_size": 16},
        "seeds": [0]}


@pytest.mark.fast
def test_images_shrink_by_area_averaging_and_never_grow():
    data = prepare("synthetic:classes=4,per_class=12,size=64", 64)
    small = data.at_res(32)
    for name, (x, y) in data.sets.items():
        want = F.interpolate(x.float(), size=(32, 32), mode="area").round().to(torch.uint8)
        assert torch.equal(small.sets[name][0], want) and torch.equal(small.sets[name][1], y)
    assert data.at_res(64) is data
    with pytest.raises(Exception, match="decode at 128"):
        data.at_res(128)


@pytest.mark.fast
@pytest.mark.parametrize("change, message", [
    ({"fixed": {**SPEC["fixed"], "res": 32}}, "give the resolution as data.res (now 64), or as a factor"),
    ({"factors": {"res": [32, 128]}}, "a condition trains at res 128, above data.res 64"),
])
def test_a_resolution_the_data_cannot_give_is_one_line(tmp_path: Path, change: dict, message: str, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **change}))
    out = cli(capsys, "run", "--study", str(path), "--results", str(tmp_path))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr
    assert not (tmp_path / "pokestudy.db").exists()


def test_each_level_trains_at_its_own_resolution(ray_local, tmp_path: Path):
    from pokestudy.study import runner

    url = f"sqlite:///{tmp_path / 'pokestudy.db'}"
    path = tmp_path / "resolution-tiny.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    runner.run_study(spec.load(str(path)), storage=url, results=tmp_path, study_name="resolution-tiny")
    trials = optuna.load_study(study_name="resolution-tiny", storage=url).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2  # `sized` saw its own resolution
    records = [TrialRecord.from_trial(t) for t in trials]
    assert sorted((r.condition["res"], r.settings["res"]) for r in records) == [("32", 32), ("64", 64)]
