"""What the report's numbers average over: heterogeneity and simple effects, the scaling law's form,
factor names that collide with bookkeeping columns, and prediction figures on changed data. Studies
with known properties are written to real SQLite by the real store, then reported by the CLI."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import cli, jpeg
from tests.test_report import NOISE, _stored_study

SYNTHETIC = {"source": "synthetic:classes=4,per_class=12,size=32", "res": 32}


def _jitter(condition: dict, seed: int, scale: float = 0.003) -> float:
    """Deterministic noise per trial (not per seed alone, which the seed block would absorb)."""
    key = ",".join(f"{k}={v}" for k, v in condition.items()) + f"/{seed}"
    return scale * (zlib.crc32(key.encode()) / 2 ** 32 - 0.5) * 2


@pytest.mark.fast
def test_an_effect_that_varies_across_cells_gets_its_simple_effects_and_a_uniform_one_does_not(tmp_path: Path, capsys):
    raw = {"name": "cells", "data": SYNTHETIC, "seeds": [0, 1, 2], "fixed": {"width": 4},
           "factors": {"t": {"off": {}, "on": {"dropout": 0.1}}, "s": {"x": {}, "y": {"weight_decay": 0.01}},
                       "u": {"off": {}, "on": {"label_smoothing": 0.1}}}}

    def outcome(c: dict, seed: int) -> tuple[float, float, bool]:
        gap = 0.3 + (c["t"] == "on") * (0.02 if c["s"] == "x" else 0.10) + (c["u"] == "on") * 0.05
        return 1.0, 1.0 - gap - _jitter(c, seed), True  # t: +2 points at s=x, +10 at s=y; u: +5 everywhere

    _stored_study(tmp_path, raw, outcome)
    out = cli(capsys, "report", "--study", "cells", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    verdicts = pd.read_csv(tmp_path / "cells" / "verdicts.csv", keep_default_na=False).set_index("claim")
    assert verdicts.loc["t=on vs off", "varies_with"] == "s" and verdicts.loc["u=on vs off", "varies_with"] == ""
    assert verdicts.loc["t=on vs off", "gap_diff"] == pytest.approx(0.06, abs=0.003)  # the average over s
    simple = pd.read_csv(tmp_path / "cells" / "simple_effects.csv").set_index("claim")
    at_x, at_y = simple.loc["t=on vs off at s=x"], simple.loc["t=on vs off at s=y"]
    assert at_x["shown"] and at_y["shown"]
    assert at_x["gap_diff"] == pytest.approx(0.02, abs=0.003) and at_y["gap_diff"] == pytest.approx(0.10, abs=0.003)
    assert at_x["gap_lo"] > 0 and at_x["gap_hi"] < at_y["gap_lo"], "each simple effect with its own interval"
    assert not simple.loc[simple["effect"] == "u=on vs off", "shown"].any()
    family = int(verdicts["family"].iloc[0])
    assert family == 2 * 3 + 3  # 3 claims x (gap, test), 3 pairs of factors
    summary = (tmp_path / "cells" / "summary.md").read_text()
    assert "second family of 24 intervals" in summary  # 3 effects x 2 other factors x 2 levels x (gap, test)
    t = next(line for line in summary.splitlines() if line.startswith("- **t=on vs off**"))
    assert re.search(r"averaged over the grid; from \+(1\.9|2\.\d) points \[[^]]+\] at s=x to \+(9\.9|10\.\d) points "
                     r"\[[^]]+\] at s=y", t), t
    assert "varies with s: F(1, " in t
    u = next(line for line in summary.splitlines() if line.startswith("- **u=on vs off**"))
    assert "averaged over the grid" in u and "from " not in u and "varies with" not in u
    assert "not detectably with t" in u and "not detectably with s" in u
    assert f"**Family: {family}**" in summary and "### Where a main effect varies" in summary
    varies = summary[summary.index("### Where a main effect varies"):]
    assert "own family level (24 intervals, each at 99.79%)" in varies, "the simple effects' level, not the claims'"


@pytest.mark.fast
def test_a_wider_gap_an_interaction_a_contrast_a_reversed_gap_and_the_reference_are_reported(tmp_path: Path):
    from pokestudy.report import build

    raw = {"name": "wider", "data": SYNTHETIC, "seeds": [0, 1, 2, 3], "fixed": {"width": 4},
           "factors": {"t": {"ref": {}, "wide": {"dropout": 0.1}, "alt": {"dropout": 0.2}},
                       "s": {"x": {}, "y": {"weight_decay": 0.01}}},
           "report": {"contrasts": [{"factor": "t", "level": "alt", "reference": "wide"}], "interactions": [["t", "s"]],
                      "reference": {"label": "the student report", "train_acc": 0.98, "test_acc": 0.5}}}

    def outcome(c: dict, seed: int) -> tuple[float, float, bool]:
        # gap −10 points at t=ref (test above train), 0 at t=wide, and at t=alt 0 at s=x but +20 at s=y
        gap = -0.10 + 0.10 * (c["t"] == "wide") + (c["t"] == "alt") * (0.10 if c["s"] == "x" else 0.30)
        return 0.8, 0.8 - gap - _jitter(c, seed), True

    url, _ = _stored_study(tmp_path, raw, outcome)
    build(url, "wider", tmp_path, ("csv",), generator="pokestudy report --study wider")
    verdicts = pd.read_csv(tmp_path / "wider" / "verdicts.csv").set_index("claim")
    assert verdicts.loc["t=wide vs ref", "verdict"] == "widens the gap"
    assert verdicts.loc["t=alt vs wide", ["kind", "verdict"]].tolist() == ["contrast", "widens the gap"]
    assert verdicts.loc["t=alt vs wide", "gap_diff"] == pytest.approx(0.10, abs=0.005), "alt's mean over s − wide's"
    assert verdicts.loc["(t=alt − ref) at s=y vs x", "verdict"] == "the effect differs: wider gap"
    gap = pd.read_csv(tmp_path / "wider" / "gap.csv").set_index(["t", "s"])["gap_real"]
    assert gap[("ref", "x")].startswith("reversed [") and gap[("ref", "y")].startswith("reversed [")
    assert gap[("alt", "y")].startswith("yes [") and gap[("wide", "x")].startswith("not distinguishable from 0")
    summary = (tmp_path / "wider" / "summary.md").read_text()
    assert "For comparison, the student report: 98% train vs 50% test, a gap of 48 points." in summary
    assert "**t=alt vs wide** — widens the gap" in summary


def _frame(seeds: int, rng: np.random.Generator, noise: float = 0.01) -> pd.DataFrame:
    """A trials frame of a 2 x 2 design (t: off/on, s: x/y): each replicate shifts every condition's gap alike
    (its split), each trial adds its own noise, t=on adds 5 points."""
    shift = rng.normal(0, 0.05, seeds)
    rows = [{"factor:t": t, "factor:s": s, "seed": k, "converged": True, "test_acc": 0.6 + rng.normal(0, noise),
             "gap": 0.3 + 0.05 * (t == "on") + shift[k] + rng.normal(0, noise)}
            for k in range(seeds) for t in ("off", "on") for s in ("x", "y")]
    df = pd.DataFrame(rows)
    for f, levels in (("t", ["off", "on"]), ("s", ["x", "y"])):
        df[f"factor:{f}"] = pd.Categorical(df[f"factor:{f}"], categories=levels, ordered=True)
    return df


@pytest.mark.fast
def test_a_claim_is_one_value_per_replicate_and_an_incomplete_replicate_is_left_out():
    from pokestudy.report import power, verdicts
    from pokestudy.study.spec import ReportSpec

    df = _frame(6, np.random.default_rng(1))
    wide = df.pivot_table(index=["seed", "factor:s"], columns="factor:t", values="gap", observed=True)
    per_replicate = (wide["on"] - wide["off"]).groupby(level="seed").mean()  # the mean over s of each replicate
    analysis = verdicts.analyse(df, ReportSpec())
    row = analysis.verdicts.set_index("claim").loc["t=on vs off"]
    assert row["replicates"] == 6 and row["gap_diff"] == pytest.approx(per_replicate.mean())
    assert row["gap_sd"] == pytest.approx(per_replicate.std(ddof=1)), "the SD of replicates, not of pairs"
    e = power.interval(per_replicate, analysis.confidence)
    assert (row["gap_lo"], row["gap_hi"]) == pytest.approx((e.lo, e.hi))
    assert analysis.differences["t=on vs off"].to_numpy() == pytest.approx(per_replicate.to_numpy())
    simple = analysis.simple.set_index("claim")
    assert (simple["replicates"] == 6).all(), "simple effects are per replicate too"

    partial = df.drop(df.index[(df["seed"] == 5) & (df["factor:t"] == "on") & (df["factor:s"] == "y")])
    again = verdicts.analyse(partial, ReportSpec())
    counts = again.verdicts.set_index("claim")["replicates"]
    assert counts["t=on vs off"] == 5 and counts["s=y vs x"] == 5, "replicate 5 lacks a cell of both claims"
    assert again.simple.set_index("claim").loc["t=on vs off at s=x", "replicates"] == 6, "not of this one"
    assert again.verdicts.set_index("claim").loc["t=on vs off", "gap_diff"] == pytest.approx(per_replicate[:5].mean())


@pytest.mark.fast
def test_an_adaptive_study_gets_steins_intervals_from_its_pilot_and_says_what_undecided_claims_need():
    from pokestudy.report import power, verdicts
    from pokestudy.study.spec import ReportSpec

    df = _frame(8, np.random.default_rng(2), noise=0.04)
    plain, adaptive = verdicts.analyse(df, ReportSpec()), verdicts.analyse(df, ReportSpec(), pilot_n=3)
    values = adaptive.differences["t=on vs off"]
    e = power.interval(values, adaptive.confidence, pilot_n=3)
    row = adaptive.verdicts.set_index("claim").loc["t=on vs off"]
    assert (row["gap_sd"], row["gap_lo"], row["gap_hi"]) == pytest.approx((values[:3].std(ddof=1), e.lo, e.hi))
    assert row["gap_lo"] != pytest.approx(plain.verdicts.set_index("claim").loc["t=on vs off", "gap_lo"])
    for table, pilot in ((plain.verdicts, None), (adaptive.verdicts, 3)):
        for _, r in table.iterrows():
            want = power.needed_text(power.needed(r["gap_sd"], 0.02, plain.size, pilot_n=pilot))
            assert r["needed"] == ("" if power.decided(r["verdict"]) else want), r["claim"]
    pilot = verdicts.analyse(df[df["seed"] < 3], ReportSpec())  # as the runner plans: the pilot's claims alone
    counts = [power.needed(v.std(ddof=1), 0.02, pilot.size, pilot_n=3, ceiling=50) or 50
              for v in pilot.differences.values()]
    assert power.plan(pilot.differences.values(), 0.02, pilot.size, 50) == max(3, *counts)
    undecided = plain.verdicts[[not power.decided(v) for v in plain.verdicts["verdict"]]]
    lines = "\n".join(power.sentences(plain.verdicts, 0.02, plain.size, None, 50))
    assert len(undecided) and all(f"- {c}: about {n} replicates" in lines
                                  for c, n in zip(undecided["claim"], undecided["needed"]))
    assert "out of reach" not in lines
    tight = "\n".join(power.sentences(plain.verdicts, 0.02, plain.size, None, 8))
    assert "**Not decidable within 8 replicates**" in tight and "**±2 points is out of reach**" in tight


@pytest.mark.fast
def test_the_scaling_law_is_extrapolated_only_where_its_form_does_not_decide(tmp_path: Path, capsys):
    raw = {"name": "forms", "data": {**SYNTHETIC, "source": "synthetic:classes=4,per_class=24,size=32"},
           "seeds": [0, 1, 2], "fixed": {"width": 4},
           "factors": {"law": {"power": {}, "loglinear": {"dropout": 0.1}},
                       "size": {"eighth": {"train_fraction": 0.125}, "quarter": {"train_fraction": 0.25},
                                "half": {"train_fraction": 0.5}, "all": {}}}}
    per_class_at_full = 64 / 4  # synthetic 4 x 24, 70% to train: 64 training images, 16 per class
    fraction = {"eighth": 0.125, "quarter": 0.25, "half": 0.5, "all": 1.0}

    def outcome(c: dict, seed: int) -> tuple[float, float, bool]:
        n = per_class_at_full * fraction[c["size"]]
        gap = 0.8 * n ** -0.5 if c["law"] == "power" else 0.8 - 0.2 * np.log(n)  # 10 points at n = 64 / n = 33
        return 1.0, 1.0 - gap * (1 + NOISE[seed]) - _jitter(c, seed, 0.002), True

    _stored_study(tmp_path, raw, outcome)
    out = cli(capsys, "report", "--study", "forms", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    fits = pd.read_csv(tmp_path / "forms" / "scaling.csv", keep_default_na=False).set_index("law")
    power, loglinear = fits.loc["power"], fits.loc["loglinear"]
    assert power["form"] == "power law" and float(power["n_target_lo"]) < 64 < float(power["n_target_hi"])
    assert loglinear["power_status"].startswith("rejected") or loglinear["extrapolation"].startswith("form-dependent")
    assert loglinear["form"] != "power law"
    summary = (tmp_path / "forms" / "summary.md").read_text()
    line = next(x for x in summary.splitlines() if x.startswith("- **law=power**"))
    assert "The gap would fall to 10 points at ≈ 64 images per class [" in line and "(power law)" in line
    assert "set by the factor `size`" in summary  # a bundle that sets train_fraction: found from the spec


@pytest.mark.fast
def test_the_size_factor_is_found_from_the_spec_not_its_name():
    from pokestudy.report.scaling import size_factor
    from pokestudy.study.spec import Study

    base = {"name": "x", "seeds": [0], "data": SYNTHETIC}
    assert size_factor(Study.model_validate({**base, "factors": {"train_fraction": [0.5, 1.0]}})) == "train_fraction"
    bundles = {"amount": {"some": {"train_fraction": 0.25}, "all": {}}, "width": [4, 8]}
    assert size_factor(Study.model_validate({**base, "factors": bundles})) == "amount"
    assert size_factor(Study.model_validate({**base, "factors": {"width": [4, 8]}})) is None


@pytest.mark.fast
def test_every_condition_gets_its_own_colour_and_marker_and_rows_name_their_factors():
    from pokestudy.report import figures

    for n in (4, 12, 13):
        pairs = figures.styles(n)
        assert len({c for c, _ in pairs}) == n and len({m for _, m in pairs}) == n
    assert len(set(figures.styles(30))) == 30
    row = pd.Series({"factor:arch": "cnn", "factor:augment": "none", "seeds": 3})
    assert figures._row_label(row, ["arch", "augment"]) == "arch=cnn · augment=none"


def test_prediction_figures_say_so_when_the_data_changed(tmp_path: Path, capsys):
    folder = tmp_path / "pictures"
    for c, colour in enumerate([(220, 40, 40), (40, 200, 60), (40, 60, 220)]):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(10):
            (folder / f"class{c}" / f"{i}.jpg").write_bytes(jpeg(colour, size=(40, 40), seed=c * 100 + i))
    raw = {"name": "moved", "data": {"source": str(folder), "res": 32, "near_duplicates": 0},
           "factors": {"arch": ["cnn", "resnet"]}, "seeds": [0, 1, 2], "fixed": {"width": 4}}
    _stored_study(tmp_path, raw, lambda c, seed: (1.0, 0.7 + NOISE[seed], True))
    first = cli(capsys, "report", "--study", "moved", "--results", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "moved" / "predictions.png").exists() and "skipped" not in first.stderr
    (tmp_path / "moved" / "predictions.png").unlink()
    (folder / "class0" / "0.jpg").write_bytes(jpeg((10, 10, 10), size=(40, 40), seed=999))  # other content
    again = cli(capsys, "report", "--study", "moved", "--results", str(tmp_path))
    assert again.returncode == 0, again.stderr
    said = [line for line in again.stderr.splitlines() if "prediction figures" in line]
    assert len(said) == 1 and "the data changed since the study ran (fingerprint" in said[0]
    assert not (tmp_path / "moved" / "predictions.png").exists()
    assert (tmp_path / "moved" / "verdicts.csv").exists()  # the rest of the report is unaffected


def test_a_factor_named_epochs_and_a_bundle_named_seed_are_reported_as_themselves(ray_local, tmp_path: Path,
                                                                                   capsys):
    from pokestudy.report import trial_figure
    from pokestudy.study import runner, spec

    raw = {"name": "names", "data": SYNTHETIC, "seeds": [0, 1], "fixed": {"width": 4, "batch_size": 16},
           "factors": {"epochs": [5, 10], "seed": {"a": {}, "b": {"dropout": 0.2}}}}
    (tmp_path / "names.yaml").write_text(yaml.safe_dump(raw))
    url = f"sqlite:///{tmp_path / 'pokestudy.db'}"
    runner.run_study(spec.load(str(tmp_path / "names.yaml")), storage=url, results=tmp_path, study_name="names",
                     trial_figure=trial_figure)
    out = cli(capsys, "report", "--study", "names", "--results", str(tmp_path))
    assert out.returncode == 0, out.stderr
    trials = pd.read_csv(tmp_path / "names" / "trials.csv")
    assert {"factor:epochs", "epochs", "factor:seed", "seed"} <= set(trials.columns)
    assert sorted(trials["factor:epochs"].unique()) == [5, 10] and sorted(trials["factor:seed"].unique()) == ["a", "b"]
    assert sorted(trials["seed"].unique()) == [0, 1] and (trials["epochs"] == trials["factor:epochs"]).all()
    gap = pd.read_csv(tmp_path / "names" / "gap.csv")
    assert sorted(zip(gap["epochs"], gap["seed"])) == [(5, "a"), (5, "b"), (10, "a"), (10, "b")]
    assert (gap["seeds"] == 2).all()
    verdicts = pd.read_csv(tmp_path / "names" / "verdicts.csv").set_index("claim")
    assert list(verdicts.index) == ["epochs=10 vs 5", "seed=b vs a"]
    assert (verdicts["replicates"] == 2).all(), "both claims ran in both replicates: none is not run yet"
