"""One trial: metrics every epoch, determinism, divergence, and the `pokestudy train` command."""

from __future__ import annotations

import json

import pytest
import torch

from pokestudy import UserError
from pokestudy.cli import main
from pokestudy.data import prepare
from pokestudy.train import Diverged, Schedule, TrialConfig, quarter, run_trial, settled
from tests.conftest import cli

pytestmark = pytest.mark.fast  # the edit-test loop: `pytest -m fast`

DATA = "synthetic:classes=5,per_class=16,size=32"


@pytest.fixture(scope="module")
def data():
    return prepare(DATA, 32)


def test_training_raises_train_accuracy_and_reports_every_metric(data):
    records = []
    cfg = TrialConfig(arch="cnn", width=8, res=32, epochs=4, batch_size=16, lr=0.01)
    summary = run_trial(cfg, data, records.append)
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


def test_the_learning_rate_depends_only_on_the_step_and_the_spec(data):
    # two trials whose accuracy curves differ (augmentation, seed) get the same learning rate at every step
    base = dict(arch="cnn", width=4, res=32, epochs=6, batch_size=16, lr=0.01, warmup=1)
    a = run_trial(TrialConfig(**base), data)["history"]
    b = run_trial(TrialConfig(**base, augment="paper", seed=3), data)["history"]
    assert [r["val_acc"] for r in a] != [r["val_acc"] for r in b]
    steps = len(data.sets["train"][1]) // 16
    schedule = Schedule(TrialConfig(**base), steps)
    expected = [0.01 * schedule(e * steps) for e in range(1, 7)]
    assert [r["lr"] for r in a] == pytest.approx(expected) and [r["lr"] for r in b] == pytest.approx(expected)


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_the_schedule_warms_up_then_decays_to_zero_at_the_end_of_the_budget(decay: str):
    schedule = Schedule(TrialConfig(epochs=10, warmup=2, decay=decay), steps_per_epoch=5)
    factors = [schedule(s) for s in range(1, 51)]
    assert factors[:10] == pytest.approx([s / 10 for s in range(1, 11)]), "linear warm-up over 2 epochs"
    assert factors[10] == pytest.approx(1.0) and all(x >= y for x, y in zip(factors[10:], factors[11:]))
    assert 0 < factors[-1] <= 1 / 40 + 1e-9, "the last of the 40 decay steps runs at (nearly) zero"


def test_convergence_reads_the_last_quarter_of_a_smoothed_curve():
    def history(train: list[float], val: list[float]) -> list[dict]:
        return [{"train_acc": t, "val_acc": v} for t, v in zip(train, val)]

    rising_then_flat = [0.2, 0.4, 0.6, 0.8] + [0.95, 0.96, 0.95, 0.96] * 2 + [0.96, 0.95, 0.96, 0.96]
    assert settled(history(rising_then_flat, rising_then_flat), 0.02)["converged"] == 1.0
    still_rising = [i / 20 for i in range(16)]
    check = settled(history([1.0] * 16, still_rising), 0.02)
    assert check["converged"] == 0.0 and check["val_acc_rise"] == pytest.approx(0.2), "val rose 4 epochs x 0.05"
    noisy = [0.5, 0.9] * 8  # swings, but no trend: not a reason to call the budget short
    assert settled(history(noisy, noisy), 0.02)["converged"] == 1.0


def test_a_long_enough_budget_converges_and_a_short_one_does_not(data):
    cfg = dict(arch="cnn", width=8, res=32, batch_size=16, lr=0.01)
    long = run_trial(TrialConfig(**cfg, epochs=24), data)
    short = run_trial(TrialConfig(**cfg, epochs=2), data)  # still learning at its last epoch
    assert long["converged"] and long["final"]["train_acc"] == 1.0
    assert not short["converged"] and short["final"]["train_acc_rise"] >= 0.02


def test_early_epochs_measure_train_accuracy_on_a_subset_and_the_last_quarter_on_the_whole_split(data):
    summary = run_trial(TrialConfig(arch="cnn", width=4, res=32, epochs=12, batch_size=16, eval_subset=20), data)
    n = len(data.sets["train"][1])
    q, w = quarter(12)
    assert [r["train_eval_n"] for r in summary["history"]] == [20] * (12 - q - w) + [n] * (q + w)


def test_steps_per_epoch_fixes_the_compute_whatever_the_training_set_size(data):
    cfg = dict(arch="cnn", width=4, res=32, epochs=1, batch_size=16, steps_per_epoch=7)
    small = run_trial(TrialConfig(**cfg, train_fraction=0.25), data)["final"]
    full = run_trial(TrialConfig(**cfg), data)["final"]
    assert small["train_images"] < full["train_images"]
    assert small["steps"] == full["steps"] == 7, "7 optimizer steps per epoch, whatever the split's size"
    assert run_trial(TrialConfig(**{**cfg, "steps_per_epoch": 0}), data)["final"]["steps"] == full["train_images"] // 16


def test_leaky_offline_copies_are_made_from_validation_and_test_images_too():
    """What the leakage study measures: `paper-offline-leaky` makes its copies before the split, so copies of
    validation and test images train the model; `paper-offline` copies training images only. Here the training
    images are white and the held-out ones black: a dark copy can only come from a held-out image."""
    from pokestudy.data import Prepared
    from pokestudy.train import _training_pool

    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    white, black = torch.full((6, 3, 32, 32), 255, dtype=torch.uint8), torch.zeros((2, 3, 32, 32), dtype=torch.uint8)
    held_out = (black[:2], torch.tensor([0, 1]))
    data = Prepared(sets={"train": (white, labels), "val": held_out, "test": held_out}, classes=["a", "b"],
                    manifest={}, train_groups=torch.arange(6))
    dark = {}
    for augment in ("paper-offline", "paper-offline-leaky"):
        cfg = TrialConfig(arch="cnn", res=32, augment=augment, offline_target=10)
        x, y = _training_pool(cfg, data, torch.device("cpu"), torch.Generator().manual_seed(0))
        copies, copied = x[len(white):], y[len(white):]
        dark[augment] = torch.bincount(copied[copies.float().mean((1, 2, 3)) < 128], minlength=2).tolist()
        assert torch.equal(x[:len(white)], white), "the training split itself comes first, unchanged"
    assert dark == {"paper-offline": [0, 0], "paper-offline-leaky": [2, 2]}, \
        "per class 10 − 5 = 5 copies cycled over 3 train, 1 val and 1 test image: 2 of them held-out"


def test_bad_config_values_are_user_errors():
    for bad in ({"arch": "vgg"}, {"augment": "mixup"}, {"lr": 0.0}, {"res": 16}, {"dropout": 1.0}, {"epochs": 0},
                {"decay": "step"}, {"no_such_setting": 1}):
        with pytest.raises(UserError):
            TrialConfig(**bad)


def test_train_command_prints_one_json_object_per_epoch_then_a_final_one(capsys):
    out = cli(capsys, "train", "--data", DATA, "--arch", "cnn", "--epochs", "2", "--res", "32", "--width", "4",
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
    (["--data", DATA, "--arch", "cnn", "--lr", "-1"], "setting lr: Input should be greater than 0"),
    (["--data", DATA, "--arch", "cnn", "--res", "32", "--lr", "1e30", "--optimizer", "sgd", "--epochs", "2"],
     "loss became"),
])
def test_bad_input_is_one_line_exit_2(args, message, capsys):
    code = main(["train", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert err.startswith("pokestudy: error: ") and len(err.strip().splitlines()) == 1
