"""Precision: bf16 autocast in training and evaluation, the hardware default and its resolution when a
study is created, what the provenance records, and the bench's roof of the engine's precision."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import optuna
import pytest
import torch

from pokestudy import UserError, bench, train
from pokestudy.cli import main
from pokestudy.data import prepare
from pokestudy.study import record, runner, spec
from pokestudy.train import TrialConfig, cpu_has_bf16, default_precision, native_bf16, run_trial

pytestmark = pytest.mark.fast

DATA = "synthetic:classes=5,per_class=16,size=32"
# /proc/cpuinfo lines, cut short: the README's AMD EPYC reference machine (AVX2), an AMX Xeon, an AVX-512 BF16 one
EPYC = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse sse2 avx avx2 fma bmi2 sha_ni\n"
XEON_AMX = "model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
COOPER_LAKE = "flags\t\t: avx2 avx512f avx512_bf16\n"


@pytest.fixture(scope="module")
def data():
    return prepare(DATA, 32)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_bf16_autocasts_training_and_evaluation_and_keeps_fp32_weights(data, precision: str, dtype: torch.dtype):
    seen: set[tuple[bool, torch.dtype]] = set()  # (training?, the classifier's output dtype)
    weights: set[torch.dtype] = set()

    def hook(module: torch.nn.Module, args, out) -> None:
        if isinstance(module, torch.nn.Linear):
            seen.add((module.training, out.dtype))
            weights.update(p.dtype for p in module.parameters())

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        summary = run_trial(TrialConfig(arch="cnn", width=4, res=32, epochs=2, batch_size=16, steps_per_epoch=2,
                                        lr=0.01, precision=precision), data)
    finally:
        handle.remove()
    assert seen == {(True, dtype), (False, dtype)}, "autocast in training and in evaluation alike, or neither"
    assert weights == {torch.float32}, "master weights stay fp32"
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in summary["history"])
    assert summary["config"]["precision"] == precision


def test_the_cpu_flag_parser_finds_native_bf16_only_where_the_flags_say_so():
    assert not cpu_has_bf16(EPYC) and not cpu_has_bf16("") and not cpu_has_bf16("model name\t: amx_bf16 lookalike\n")
    assert cpu_has_bf16(XEON_AMX) and cpu_has_bf16(COOPER_LAKE)


@pytest.mark.parametrize("cpuinfo, native", [(EPYC, False), (XEON_AMX, True), (None, False)])
def test_native_bf16_is_read_from_the_cpu_and_auto_is_bf16_only_where_it_is_native(
        tmp_path: Path, monkeypatch, cpuinfo: str | None, native: bool):
    path = tmp_path / "cpuinfo"  # None: no /proc/cpuinfo (not Linux): unknown, so not native
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    monkeypatch.setattr(train, "CPUINFO", path)
    assert native_bf16(torch.device("cpu")) == native
    assert default_precision("cpu") == ("bf16" if native else "fp32"), "emulated bf16 is slower than fp32"


def test_a_precision_other_than_fp32_or_bf16_is_one_line(capsys):
    with pytest.raises(UserError, match=r"^setting precision: Input should be 'fp32' or 'bf16'$"):
        TrialConfig(precision="fp16")
    code = main(["train", "--data", DATA, "--arch", "cnn", "--res", "32", "--precision", "fp16"])
    err = capsys.readouterr().err
    assert code == 2 and err == "pokestudy: error: setting precision: Input should be 'fp32' or 'bf16'\n"
    smoke = spec.available()["smoke"].replace("fixed: {", "fixed: {precision: fp16, ")
    with pytest.raises(UserError, match=r"^smoke.yaml: setting precision: Input should be 'fp32' or 'bf16'$"):
        spec.parse(smoke, "smoke.yaml")
    with pytest.raises(UserError, match="setting precision"):
        bench.bench_precision("fp16", torch.device("cpu"))


def test_auto_resolves_into_the_design_and_fp32_keeps_the_identity_studies_had_before():
    overfit = spec.load("overfit")
    assert overfit.with_precision("fp32").design() == overfit.design(), "fp32 stays implicit: old identities hold"
    assert overfit.with_precision("bf16").design()["fixed"]["precision"] == "bf16"
    auto = spec.parse(spec.available()["smoke"].replace("fixed: {", "fixed: {precision: auto, "), "smoke.yaml")
    assert auto.with_precision("fp32").design() == spec.load("smoke").design()
    assert TrialConfig.from_dict(auto.with_precision("bf16").settings(auto.conditions()[0])).precision == "bf16"
    explicit = spec.parse(spec.available()["smoke"].replace("fixed: {", "fixed: {precision: fp32, "), "smoke.yaml")
    kept = explicit.with_precision("bf16")
    assert TrialConfig.from_dict(kept.settings(kept.conditions()[0])).precision == "fp32", "a named one is kept"
    study = spec.load("precision")
    assert study.with_precision("bf16") == study, "a factor sets it: nothing to resolve"
    assert record.precisions(study) == ["bf16", "fp32"] and len(study.trials()) == 20  # the 5-replicate pilot


def test_a_resumed_study_keeps_the_precision_it_was_created_with(tmp_path: Path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    smoke = spec.load("smoke")
    monkeypatch.setattr(runner, "default_precision", lambda device: "bf16")  # as on an AMX Xeon
    assert runner._created_precision(smoke, url, "smoke", False, None) == "bf16", "new: the hardware's default"
    made = optuna.create_study(study_name="smoke", storage=url)
    made.set_user_attr("spec", smoke.model_dump(mode="json"))  # created on a machine without native bf16
    assert runner._created_precision(smoke, url, "smoke", False, None) == "fp32", "resumed: what it was made with"
    assert runner._created_precision(smoke, url, "smoke", True, None) == "bf16", "restarted: the hardware's again"
    made.set_user_attr("spec", smoke.with_precision("bf16").model_dump(mode="json"))
    monkeypatch.setattr(runner, "default_precision", lambda device: "fp32")
    assert runner._created_precision(smoke, url, "smoke", False, None) == "bf16"


def test_the_provenance_says_which_precision_ran_and_whether_the_hardware_has_native_bf16(data):
    p = record.provenance(data.manifest, 1, record.now(), precisions=["bf16", "fp32"])
    assert p.precision == ["bf16", "fp32"] and p.native_bf16["cpu"] == native_bf16("cpu")
    assert (p.native_bf16["gpu"] is None) == (not torch.cuda.is_available())
    cpu = "yes" if p.native_bf16["cpu"] else "no"
    assert f"precision bf16 and fp32 (native bf16: CPU {cpu}" in record.provenance_line(p)
    stored = asdict(p)
    assert record.Provenance.read(stored, "study 's'") == p, "what is stored reads back the same"
    older = {k: v for k, v in stored.items() if k not in ("precision", "native_bf16", "ray_cluster", "budget")}
    assert "precision" not in record.provenance_line(record.Provenance.read(older, "study 's'"))  # stored before
    with pytest.raises(record.RecordError, match="study 's''s provenance has no started"):
        record.Provenance.read({k: v for k, v in stored.items() if k != "started"}, "study 's'")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_bench_runs_its_study_and_its_roof_in_the_engine_precision(tmp_path: Path, precision: str):
    cfg = TrialConfig(arch="cnn", res=32, epochs=1, precision=precision)
    study = spec.load(str(bench._spec(tmp_path / "b.yaml", "b", DATA, 32, cfg, 1)))
    assert [TrialConfig.from_dict(w.settings).precision for w in study.trials()] == [precision]
    assert bench.matmul_flops(torch.device("cpu"), precision, n=64, repeat=1, windows=1) > 0
    assert bench.bench_precision("auto", torch.device("cpu")) == default_precision("cpu")


@pytest.mark.fast
def test_naming_fp32_is_the_same_experiment_as_leaving_precision_out():
    named = spec.parse("name: x\nfactors: {arch: [cnn]}\nreplicates: 3\nfixed: {precision: fp32}\n", "x.yaml")
    implicit = spec.parse("name: x\nfactors: {arch: [cnn]}\nreplicates: 3\n", "x.yaml")
    assert named.with_precision("bf16").design() == implicit.with_precision("fp32").design()
