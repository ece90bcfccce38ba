"""One trial: metrics every epoch, determinism, divergence, and the `pokestudy train` command."""

from __future__ import annotations

import json

import pytest

from pokestudy import UserError
from pokestudy.cli import main
from pokestudy.data import prepare
from pokestudy.train import Diverged, TrialConfig, run_trial
from tests.conftest import pokestudy

pytestmark = pytest.mark.fast  # the edit-test loop: `pytest -m fast`

DATA = "synthetic:classes=5,per_class=16,size=32"


@pytest.fixture(scope="module")
def data():
    return prepare(DATA, 32)


def test_training_raises_train_accuracy_and_reports_every_metric(data):
    records = []
    summary = run_trial(TrialConfig(arch="cnn", width=8, res=32, epochs=4, batch_size=16, lr=0.01), data, records.append)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    for key in ("train_loss", "train_acc", "train_acc_augmented", "val_acc", "test_acc", "gap",
                "images_per_s", "seconds"):
        assert key in records[-1]
    assert records[-1]["train_acc"] > records[0]["train_acc"] and records[-1]["train_acc"] > 0.6
    assert records[-1]["gap"] == pytest.approx(records[-1]["train_acc"] - records[-1]["test_acc"])
    assert len(summary["test_predictions"]) == len(data.sets["test"][1])


@pytest.mark.parametrize("arch,augment", [("resnet", "none"), ("resnet", "paper"), ("cnn", "paper-offline")])
def test_same_seed_same_numbers(data, arch: str, augment: str):
    # a width-4 ResNet is the case where oneDNN's channels_last kernels give run-to-run different gradients
    cfg = TrialConfig(arch=arch, width=4, res=32, epochs=2, batch_size=16, augment=augment, offline_target=20)
    strip = lambda s: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in s["history"]]
    assert strip(run_trial(cfg, data)) == strip(run_trial(cfg, data))


def test_a_diverging_loss_stops_the_trial_with_a_clear_error(data):
    with pytest.raises(Diverged, match="loss became"):
        run_trial(TrialConfig(arch="cnn", width=4, res=32, epochs=3, batch_size=16, lr=1e30, optimizer="sgd"), data)


def test_the_plateau_rule_cuts_the_learning_rate_at_each_stall_then_stops_converged(data):
    cfg = TrialConfig(arch="cnn", width=4, res=32, epochs=60, batch_size=16, lr=0.01, patience=2, lr_cuts=2)
    summary = run_trial(cfg, data)
    history = summary["history"]
    assert summary["converged"] and len(history) < 60
    lrs = [r["lr"] for r in history]
    assert sorted(set(lrs), reverse=True) == pytest.approx([0.01, 0.001, 0.0001]) and lrs == sorted(lrs, reverse=True)
    assert history[-1]["lr"] == pytest.approx(0.0001), "stopped at the lowest learning rate, never mid-schedule"
    for k in ("val_acc", "train_acc"):  # the last `patience` epochs made no progress on either
        before = max(r[k] for r in history[:-2])
        assert all(r[k] <= before + cfg.min_delta for r in history[-2:])


def test_a_trial_that_reaches_the_epoch_cap_is_not_converged(data):
    summary = run_trial(TrialConfig(arch="cnn", width=4, res=32, epochs=2, batch_size=16, patience=3), data)
    assert not summary["converged"] and summary["final"]["epoch"] == 2


def test_bad_config_values_are_user_errors():
    for bad in ({"arch": "vgg"}, {"augment": "mixup"}, {"lr": 0.0}, {"res": 16}, {"dropout": 1.0}, {"patience": 0}):
        with pytest.raises(UserError):
            TrialConfig(**bad)


def test_train_command_prints_one_json_object_per_epoch_then_a_final_one():
    out = pokestudy("train", "--data", DATA, "--arch", "cnn", "--epochs", "2", "--res", "32", "--width", "4",
                    "--batch-size", "16", "--json")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [l["epoch"] for l in lines[:-1]] == [1, 2] and lines[-1]["final"] is True


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/folder", "--arch", "cnn"], "does not exist"),
    (["--data", DATA, "--arch", "vgg"], "unknown arch"),
    (["--data", DATA, "--arch", "cnn", "--augment", "cutmix"], "unknown augmentation"),
    (["--data", DATA, "--arch", "cnn", "--res", "8"], "out of range"),
    (["--data", DATA, "--arch", "cnn", "--res", "2048"], "out of range"),
    (["--data", DATA, "--arch", "cnn", "--lr", "-1"], "learning rate"),
    (["--data", DATA, "--arch", "cnn", "--res", "32", "--lr", "1e30", "--optimizer", "sgd", "--epochs", "2"],
     "loss became"),
])
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    code = main(["train", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert err.startswith("pokestudy: error: ") and len(err.strip().splitlines()) == 1
