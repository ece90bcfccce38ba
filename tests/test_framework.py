"""Your own model and data: `arch: torchvision:NAME` or `package.module:function`, a model's own settings as
factors, a data function returning arrays, and every mistake among them one line before anything runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from pokestudy import imports
from pokestudy.cli import main
from pokestudy.data import load
from pokestudy.study import spec
from tests.conftest import ROOT, cli, pokestudy
from tests.test_reliability import assert_one_line_error

MINE = "tests.my_models:tiny"
DATA = "tests.my_data:arrays"


def write(tmp_path: Path, name: str = "mine", **changes) -> Path:
    """A tiny study on the arrays of `tests/my_data.py`: 32 px, 2 epochs, with `changes`."""
    raw = {"name": name, "question": "Does a user's own model and data run?",
           "data": {"source": DATA, "res": 32}, "factors": {"arch": ["cnn", MINE]},
           "fixed": {"epochs": 2, "batch_size": 16, "lr": 0.01}, "seeds": [0], **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run(tmp_path: Path, path: Path, capsys) -> tuple[int, str]:
    """`pokestudy run` in-process (the console script's entry point): exit code and stderr."""
    code = main(["run", "--study", str(path), "--results", str(tmp_path / "results")])
    return code, capsys.readouterr().err


def nothing_stored(tmp_path: Path) -> bool:
    db = tmp_path / "results" / "pokestudy.db"
    return not db.exists() or optuna.get_all_study_summaries(f"sqlite:///{db}") == []


@pytest.mark.fast
@pytest.mark.parametrize("changes, message", [
    ({"factors": {"arch": ["tests.nowhere:tiny"]}}, "cannot import tests.nowhere"),
    ({"factors": {"arch": ["tests.my_models:nothing"]}}, "module tests.my_models has no function nothing"),
    ({"factors": {"arch": ["tests.my_models:raises"]}}, "failed to build .*this builder is broken$"),
    ({"factors": {"arch": ["tests.my_models:ten_classes"]}}, r"to \(2, 10\) in train mode; expected \(2, 5\)"),
    ({"factors": {"arch": ["tests.my_models:not_a_module"]}}, "returned a str; a builder must return"),
    ({"factors": {"arch": ["tests.my_models:no_res"]}}, "must take the keyword arguments num_classes and res"),
    ({"factors": {"arch": [MINE]}, "fixed": {"model.depht": 2}}, "takes no setting model.depht; it takes model.depth"),
    ({"factors": {"arch": ["torchvision:resnet1800"]}}, "torchvision has no classification model 'resnet1800'"),
    ({"factors": {"arch": ["torchvision:resnet18"]}, "fixed": {"model.weights": "DEFAULT"}}, "never downloading"),
    ({"factors": {"arch": ["torchvision:resnet18"]}, "fixed": {"model.depth": 2}}, "unexpected keyword .*'depth'"),
    ({"factors": {"arch": ["vgg"]}}, "unknown arch 'vgg'; choose cnn, resnet, torchvision:NAME"),
    ({"fixed": {"width": 8}}, f"width=8 shapes only the built-in archs .*arch {MINE}"),
    ({"factors": {"arch": ["cnn"]}, "fixed": {"model.depth": 2}}, "built-in arch cnn takes no model settings"),
    ({"data": {"source": "tests.my_data:floats", "res": 32}}, "images of shape .* and dtype float32; expected uint8"),
    ({"data": {"source": "tests.my_data:grey", "res": 32}}, r"images of shape \(48, 40, 40\)"),
    ({"data": {"source": "tests.my_data:label_out_of_range", "res": 32}}, "expected 48 integers from 0 to 3"),
    ({"data": {"source": "tests.my_data:two_things", "res": 32}}, r"expected a tuple \(images, labels, classes\)"),
    ({"data": {"source": "tests.my_data:raises", "res": 32}}, "raised FileNotFoundError: /data/mine.npz"),
    ({"data": {"source": "tests.my_data:nothing", "res": 32}}, "module tests.my_data has no function nothing"),
])
def test_each_mistake_in_a_model_or_data_function_is_one_line_exit_2_and_nothing_stored(
        tmp_path: Path, capsys, changes: dict, message: str):
    code, err = run(tmp_path, write(tmp_path, **changes), capsys)
    assert code == 2, err
    notice, _, error = err.rpartition("pokestudy: error: ")
    assert notice in ("", "study mine runs code from tests.my_models, tests.my_data (a spec runs the code it names: "
                          "run only specs you trust)\n"), err  # a data function runs after the notice: it may follow
    assert_one_line_error(f"pokestudy: error: {error}")
    assert re.search(message, error.strip()), err
    assert nothing_stored(tmp_path)


@pytest.mark.fast
@pytest.mark.parametrize("function", ["arrays", "channels_first", "pictures"])
def test_a_data_function_returns_numpy_torch_or_pil_and_is_decoded_into_the_cache(function: str):
    ds = load(f"tests.my_data:{function}", 32)
    assert ds.images.shape == (48, 3, 32, 32) and ds.classes == ["red", "green", "blue", "grey"]
    assert ds.labels.bincount().tolist() == [12] * 4
    assert ds.paths[5] == f"tests.my_data:{function}[5]"
    if function == "arrays":  # its groups are pairs of images; the others give none: one group per image
        assert len(set(ds.groups.tolist())) == 24


@pytest.mark.fast
def test_the_fingerprint_covers_what_the_function_returns(monkeypatch: pytest.MonkeyPatch):
    before = load(DATA, 32).manifest["fingerprint"]
    assert load(DATA, 32).manifest["fingerprint"] == before
    monkeypatch.setenv("MY_DATA_SHIFT", "7")  # one channel of one pixel of 48 images
    assert load(DATA, 32).manifest["fingerprint"] != before


def test_data_info_on_a_data_function(capsys):
    assert main(["data", "info", "--data", DATA, "--res", "32"]) == 0
    out = capsys.readouterr().out
    assert "classes     4\nimages      48" in out and "fingerprint" in out


@pytest.mark.fast
def test_no_shipped_spec_imports_code_outside_pokestudy_torch_and_torchvision(tmp_path: Path):
    for name in spec.available():
        assert imports.modules(spec.load(name)) == [], name
    study = spec.load(str(write(tmp_path)))
    assert imports.modules(study) == ["tests.my_models", "tests.my_data"]
    assert imports.modules(study, data="synthetic") == ["tests.my_models"]


def test_a_study_over_a_builtin_a_torchvision_and_a_users_model_on_a_users_arrays_runs_to_verdicts(
        tmp_path: Path, ray_local, capsys):
    path = write(tmp_path, factors={"arch": ["cnn", "torchvision:mobilenet_v3_small", MINE]}, seeds=[0, 1, 2])
    code, err = run(tmp_path, path, capsys)
    assert code == 0, err
    assert "study mine runs code from tests.my_models, tests.my_data (a spec runs the code it names" in err
    trials = optuna.load_study(study_name="mine", storage=f"sqlite:///{tmp_path / 'results' / 'pokestudy.db'}")
    assert len(trials.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 9
    claims = pd.read_csv(tmp_path / "results" / "mine" / "verdicts.csv")
    assert len(claims) == 2 and claims["verdict"].notna().all()  # each arch against cnn


def test_a_models_own_setting_as_a_factor_reaches_its_builder(tmp_path: Path, ray_local, capsys):
    log = tmp_path / "calls.jsonl"
    path = write(tmp_path, factors={"model.depth": [1, 2]}, fixed={"arch": MINE, "model.log": str(log),
                                                                   "epochs": 1, "batch_size": 16})
    code, err = run(tmp_path, path, capsys)
    assert code == 0, err
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    trained = sorted(c["depth"] for c in calls if c["num_classes"] == 4)  # the spec's check builds with 5
    assert trained == [1, 2] and all(c["res"] == 32 for c in calls)
    stored = optuna.load_study(study_name="mine", storage=f"sqlite:///{tmp_path / 'results' / 'pokestudy.db'}")
    assert sorted(t.params["model.depth"] for t in stored.get_trials()) == ["1", "2"]


def test_an_edited_builder_makes_a_rerun_another_experiment_and_an_unedited_rerun_runs_nothing(tmp_path: Path):
    """Each run is `pokestudy run` in the user's directory, as a user reruns it: its own local Ray, whose
    workers import the builder from there (the session's Ray gives its workers the directory it started in)."""
    net = tmp_path / "edited_net.py"
    shutil.copy(ROOT / "tests" / "my_models.py", net)
    path = write(tmp_path, name="edited", data={"source": "synthetic", "res": 32},
                 factors={"arch": ["edited_net:tiny"]}, fixed={"epochs": 1, "batch_size": 16})

    def rerun(timeout: float = 300) -> subprocess.CompletedProcess:
        return pokestudy("run", "--study", path.name, "--results", "results", cwd=tmp_path, timeout=timeout)

    def complete() -> int:
        stored = optuna.load_study(study_name="edited", storage=f"sqlite:///{tmp_path / 'results' / 'pokestudy.db'}")
        return len(stored.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))

    first = rerun(timeout=600)  # it starts Ray and trains
    assert first.returncode == 0 and complete() == 1, first.stderr
    same = rerun()
    assert same.returncode == 0 and "already finished (1 trials)" in same.stderr and complete() == 1, same.stderr
    net.write_text(net.read_text().replace("nn.ReLU()]", "nn.GELU()]"))
    edited = rerun()
    assert edited.returncode == 2, edited.stderr
    notice, _, error = edited.stderr.rpartition("pokestudy: error: ")
    assert notice == ("study edited runs code from edited_net (a spec runs the code it names: run only specs you "
                      "trust)\n"), edited.stderr
    assert_one_line_error(f"pokestudy: error: {error}")
    assert re.fullmatch(r"study 'edited' in this storage is a different experiment \(code\.edited_net:tiny: "
                        r"[0-9a-f]{12} → [0-9a-f]{12}\); use --study-name NEW .*", error.strip()), error
    assert complete() == 1


@pytest.mark.fast
def test_only_a_users_builder_puts_code_in_the_identity(tmp_path: Path):
    """Shipped studies, built-ins and torchvision keep the identity they had: no `code` in their design."""
    for name in spec.available():
        assert "code" not in spec.load(name).design(), name
    torchvision = spec.load(str(write(tmp_path, factors={"arch": ["cnn", "torchvision:resnet18"]})))
    assert "code" not in torchvision.design()
    mine = spec.load(str(write(tmp_path, factors={"arch": ["cnn", "torchvision:resnet18", MINE]})))
    assert mine.design()["code"] == {MINE: imports.code_digest(MINE)}
    assert mine.design()["factors"] == mine.model_dump(mode="json")["factors"]


def readme_blocks() -> dict[str, str]:
    """The README's own-study files, by the name on each block's first line (`# my_net.py`)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own model and data"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```(?:python|yaml)\n# (\S+)\n(.*?)```", section, re.S)
    return {name: f"# {name}\n{body}" for name, body in blocks}


@pytest.mark.fast
def test_the_readmes_own_study_loads_as_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    files = readme_blocks()
    assert set(files) == {"make_images.py", "my_net.py", "my_dataset.py", "my-study.yaml"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    exec(files["make_images.py"], {})  # noqa: S102 — the README's toy images, as printed
    monkeypatch.setattr(sys, "path", list(sys.path))  # the current directory is added to it: not for later tests
    study = spec.load("my-study.yaml")
    assert imports.modules(study) == ["my_net", "my_dataset"]
    settings = [study.settings(c) for c in study.conditions()]
    assert {s["arch"] for s in settings} == {"torchvision:mobilenet_v3_small", "my_net:tiny"}
    assert {s.get("model.depth") for s in settings} == {None, 1, 3}
    assert main(["data", "info", "--data", study.data.source, "--res", str(study.data.res)]) == 0
    assert "classes     3\nimages      300" in capsys.readouterr().out


def test_the_readmes_python_example_runs_as_printed_and_reads_what_the_files_hold(
        smoke_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    _, finished = smoke_run
    shutil.copytree(finished, tmp_path / "results")  # the smoke study, run: `pokestudy.run` resumes it
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## Python API"):], re.S).group(1)
    names: dict = {}
    exec(code, names)  # noqa: S102 — the README's own example, as printed
    done, again = names["done"], names["again"]
    assert "already finished" in capsys.readouterr().err
    for got, stem in ((again.conditions, "gap"), (again.verdicts, "verdicts"), (done.verdicts, "verdicts")):
        files = pd.read_csv(tmp_path / "results" / "smoke" / f"{stem}.csv")
        assert list(files.columns) == list(got.columns) and len(files) == len(got)
        for c in files.columns:
            if pd.api.types.is_float_dtype(files[c]):  # numbers, and blanks where a cell holds none
                mine = pd.to_numeric(got[c], errors="coerce")
                np.testing.assert_allclose(mine, files[c], rtol=1e-5, equal_nan=True, err_msg=c)
    assert set(again.trials["arch"]) == {"cnn", "resnet"} and len(again.trials) == 16


@pytest.mark.fast
def test_pokestudy_new_writes_a_starting_spec_that_loads_and_never_overwrites(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.chdir(tmp_path)  # `pokestudy new` writes into the current directory
    made = cli(capsys, "new", "mine")
    assert made.returncode == 0, made.stderr
    study = spec.load(str(tmp_path / "mine.yaml"))
    assert study.name == "mine" and study.data.split == "resample" and len(study.replicate_seeds()) == 3
    (tmp_path / "mine.yaml").write_text("edited")
    again = cli(capsys, "new", "mine")
    assert again.returncode == 2 and "exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert (tmp_path / "mine.yaml").read_text() == "edited", "a user's edits are never overwritten"
