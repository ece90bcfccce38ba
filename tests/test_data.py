"""Data: messy folders, synthetic data, the cache and the splits (the sprites package: `test_sprites.py`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pokestudy import UserError
from pokestudy.data import load, prepare
from pokestudy.data.split import split
from tests.conftest import cli

pytestmark = pytest.mark.fast  # the edit-test loop: `pytest -m fast`


def test_messy_folder_is_decoded_by_content_and_every_skip_has_a_reason(messy_folder: Path):
    ds = load(str(messy_folder), 32)
    skipped = {s["path"]: s["reason"] for s in ds.manifest["skipped"]}
    assert set(skipped) == {"class0/vector.svg", "class0/vector-named.png", "class0/truncated.jpg", "class1/bomb.png"}
    assert "decompression bomb" in skipped["class1/bomb.png"] or "too large" in skipped["class1/bomb.png"]
    assert ds.manifest["duplicates"] == [{"path": "class0/copy.jpg", "copy_of": "class0/0.jpg"}]
    # 8 + lying.asp + .png.sb-… + .jpg') in class0; 8 + palette, gray, rgba, huge in class1; 8; 1 in tiny
    assert torch.bincount(ds.labels).tolist() == [11, 12, 8, 1]
    assert ds.images.shape[1:] == (3, 32, 32) and ds.images.dtype == torch.uint8
    rgba = ds.images[ds.labels == 1]
    assert (rgba[..., 0, 0] == 255).any(), "transparent pixels are composited on white"


def test_cache_is_reused_while_inputs_are_unchanged_and_rebuilt_when_they_change(messy_folder: Path):
    first = load(str(messy_folder), 32)
    mtime = first.path.stat().st_mtime_ns
    assert load(str(messy_folder), 32).path.stat().st_mtime_ns == mtime
    (messy_folder / "class2" / "new.jpg").write_bytes((messy_folder / "class1" / "0.jpg").read_bytes()[:-1] + b"\xd9")
    changed = load(str(messy_folder), 32)
    assert changed.path != first.path


@pytest.mark.parametrize("problem, message", [
    ("missing", "does not exist"),
    ("no-classes", "no class sub-folders"),
    ("undecodable-class", "no decodable image"),
])
def test_bad_folders_are_refused_without_writing_a_cache(tmp_path: Path, private_cache: Path, problem: str,
                                                         message: str):
    path = tmp_path / "data"
    if problem == "no-classes":
        path.mkdir()
        (path / "stray.jpg").write_bytes(b"x")
    elif problem == "undecodable-class":
        (path / "ok").mkdir(parents=True)
        (path / "broken").mkdir()
        (path / "broken" / "a.jpg").write_text("not an image")
    before = set((private_cache / "datasets").glob("*")) if (private_cache / "datasets").exists() else set()
    with pytest.raises(UserError, match=message):
        load(str(path), 32)
    after = set((private_cache / "datasets").glob("*")) if (private_cache / "datasets").exists() else set()
    assert after == before


def test_synthetic_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two cold decodes, each into a cache of its own: the second cannot read what the first wrote."""
    decoded = []
    for cache in ("first", "second"):
        monkeypatch.setenv("POKESTUDY_CACHE", str(tmp_path / cache))
        decoded.append(load("synthetic:classes=4,per_class=6,size=16", 32))
    a, b = decoded
    assert a.path.is_relative_to(tmp_path / "first") and b.path.is_relative_to(tmp_path / "second")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.groups, b.groups)
    assert a.manifest == b.manifest and a.manifest["images"] == 24


def _groups_by_split(labels, groups, idx):
    return {s: set(groups[i].tolist()) for s, i in idx.items()}


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_splits_are_group_aware_stratified_and_deterministic(seed: int):
    ds = load("synthetic:classes=5,per_class=30,size=16", 32)
    idx = split(ds.labels, ds.groups, seed=seed)
    g = _groups_by_split(ds.labels, ds.groups, idx)
    assert not (g["train"] & g["val"]) and not (g["train"] & g["test"]) and not (g["val"] & g["test"])
    assert sum(len(i) for i in idx.values()) == len(ds.labels)
    for s in ("train", "val", "test"):
        assert set(ds.labels[idx[s]].tolist()) == set(range(5)), f"every class appears in {s}"
    assert 0.6 < len(idx["train"]) / len(ds.labels) < 0.8
    again = split(ds.labels, ds.groups, seed=seed)
    assert all(torch.equal(idx[s], again[s]) for s in idx)
    other = split(ds.labels, ds.groups, seed=seed + 100)
    assert not all(torch.equal(idx[s], other[s]) for s in idx)


def test_duplicates_never_straddle_a_split(messy_folder: Path):
    """class0/copy.jpg holds 0.jpg's bytes: under the exact-bytes rule alone, split after split, the picture
    lands in one split only, and once (the copy is dropped, not trained or tested on twice)."""
    ds = load(str(messy_folder), 32)
    picture = ds.images[ds.paths.index("class0/0.jpg")]
    found = {}
    for seed in range(8):
        data = prepare(str(messy_folder), 32, split_seed=seed, near_duplicates=0)
        found[seed] = [s for s in ("train", "val", "test") for x in data.sets[s][0] if torch.equal(x, picture)]
    assert all(len(set(where)) == 1 for where in found.values()), f"the picture straddles a split: {found}"
    assert all(len(where) == 1 for where in found.values()), f"the copy is kept beside its original: {found}"


def test_data_info_json(messy_folder: Path, capsys):
    out = cli(capsys, "data", "info", "--data", str(messy_folder), "--res", "32", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["classes"] == 4 and info["images"] == 32 and len(info["duplicates"]) == 1
    assert {s["path"] for s in info["skipped"]} >= {"class0/vector.svg", "class0/truncated.jpg"}
    assert sum(info["splits"].values()) == 32 and Path(info["cache"]).is_file()


def test_the_same_bytes_under_two_classes_are_a_label_conflict_and_neither_copy_is_used(messy_folder: Path,
                                                                                        capsys):
    original = messy_folder / "class2" / "3.jpg"
    (messy_folder / "class1" / "stray.jpg").write_bytes(original.read_bytes())
    out = cli(capsys, "data", "info", "--data", str(messy_folder), "--res", "32")
    assert out.returncode == 0, out.stderr
    assert "conflicts   1" in out.stdout and "class2/3.jpg = class1/stray.jpg" in out.stdout.replace(
        "class1/stray.jpg = class2/3.jpg", "class2/3.jpg = class1/stray.jpg")
    ds = load(str(messy_folder), 32)
    assert ds.manifest["conflicts"] == [{"classes": ["class1", "class2"],
                                         "paths": ["class1/stray.jpg", "class2/3.jpg"]}]
    assert torch.bincount(ds.labels).tolist() == [11, 12, 7, 1], "the class2 original is dropped as well"
    assert len(ds.manifest["duplicates"]) == 1


def test_the_fingerprint_follows_content_not_file_times(messy_folder: Path):
    first = load(str(messy_folder), 32).manifest["fingerprint"]
    path = messy_folder / "class2" / "3.jpg"
    path.write_bytes(path.read_bytes())  # new mtime, same bytes: the cache is rebuilt, the identity is not
    assert load(str(messy_folder), 32).manifest["fingerprint"] == first
    path.write_bytes((messy_folder / "class2" / "4.jpg").read_bytes()[:-2] + b"\xff\xd9")
    assert load(str(messy_folder), 32).manifest["fingerprint"] != first


def test_an_outside_evaluation_set_matches_classes_by_normalised_name(tmp_path: Path):
    from tests.conftest import jpeg

    train, outside = tmp_path / "train", tmp_path / "outside"
    for c, name in enumerate(["Mr. Mime", "Pikachu", "Zubat"]):
        (train / name).mkdir(parents=True)
        for i in range(4):
            (train / name / f"{i}.jpg").write_bytes(jpeg((60 * c, 200 - 50 * c, 90), seed=10 * c + i))
    for folder, seeds in {"mr-mime": [101, 102], "MrMime": [103], "MR MIME": [104], "pikachu": [105],
                          "Missingno": [106]}.items():
        (outside / folder).mkdir(parents=True)
        for s in seeds:
            (outside / folder / f"{s}.jpg").write_bytes(jpeg((200, 100, 50), seed=s))
    (outside / "pikachu" / "copy.jpg").write_bytes((train / "Pikachu" / "0.jpg").read_bytes())
    data = prepare(str(train), 32, evals={"kaggle": str(outside)})
    x, y = data.sets["kaggle"]
    assert torch.bincount(y, minlength=3).tolist() == [4, 1, 0] and x.shape[1:] == (3, 32, 32)
    info = data.manifest["evals"]["kaggle"]
    assert info["unmatched"] == ["Missingno"] and info["copies_of_training_images"] == 1 and info["classes"] == 2
    with pytest.raises(UserError, match="no class folder matches a training class"):
        prepare(str(outside / "Missingno" / ".."), 32, evals={"other": str(train / "..")})
    with pytest.raises(UserError, match="name 'test' is taken"):
        prepare(str(train), 32, evals={"test": str(outside)})


def test_train_reports_accuracy_and_gap_on_an_outside_set(tmp_path: Path, capsys):
    from pokestudy.cli import main
    from tests.conftest import jpeg

    (tmp_path / "Class 001").mkdir()
    (tmp_path / "Class 001" / "a.jpg").write_bytes(jpeg((10, 20, 30)))
    code = main(["train", "--data", "synthetic:classes=3,per_class=12,size=32", "--arch", "cnn", "--res", "32",
                 "--width", "4", "--epochs", "1", "--json", "--eval", f"kaggle={tmp_path}"])
    out = capsys.readouterr()
    assert code == 0, out.err
    first = json.loads(out.out.splitlines()[0])
    assert "kaggle_acc" in first and "kaggle_gap" in first


PICTURES = Path(__file__).parent / "fixtures" / "pokemon"  # 15 pictures of the report's dataset, 5 per class


def _pictures(root: Path, per_class: int) -> Path:
    """The first `per_class` fixture pictures of each class, copied into `root`."""
    for d in sorted(PICTURES.iterdir()):
        (root / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir())[:per_class]:
            (root / d.name / f.name).write_bytes(f.read_bytes())
    return root


def _near_copy(src: Path, dest: Path) -> None:
    """The same picture as a collector would meet it again: cropped 3% a side, rescaled to 60%, re-encoded."""
    from PIL import Image

    img = Image.open(src).convert("RGB")
    w, h = img.size
    img = img.crop((round(0.03 * w), round(0.03 * h), round(0.97 * w), round(0.97 * h)))
    img.resize((round(0.6 * img.width), round(0.6 * img.height))).save(dest, "JPEG", quality=80)


def _split_of(data, image: torch.Tensor) -> str:
    return next(s for s in ("train", "val", "test") if (data.sets[s][0] == image).flatten(1).all(1).any())


def test_a_recropped_rescaled_reencoded_copy_is_a_near_duplicate_and_lands_in_its_originals_split(tmp_path: Path,
                                                                                                  capsys):
    root = _pictures(tmp_path / "pics", 4)
    _near_copy(root / "Bulbasaur" / "00000023.jpg", root / "Bulbasaur" / "copy.jpg")
    ds = load(str(root), 32)
    original, copy = ds.paths.index("Bulbasaur/00000023.jpg"), ds.paths.index("Bulbasaur/copy.jpg")
    assert ds.hashes[original] != ds.hashes[copy], "not the same bytes: the exact-bytes rule cannot see it"
    straddled = 0
    for seed in range(8):
        near = prepare(str(root), 32, split_seed=seed, near_duplicates=10)  # the global hash alone
        summary = near.manifest["near_duplicates"]
        assert (summary["threshold"], summary["groups"], summary["images"]) == (10, 1, 2)
        assert _split_of(near, ds.images[original]) == _split_of(near, ds.images[copy])
        exact = prepare(str(root), 32, split_seed=seed, near_duplicates=0)
        apart = _split_of(exact, ds.images[original]) != _split_of(exact, ds.images[copy])
        assert summary["straddled_exact_split"] == int(apart)
        straddled += apart
    assert straddled, "under the exact-bytes rule the copy straddles a split for some seed"
    for bad_rule in ("-1", "33", "10+crop"):
        bad = cli(capsys, "data", "info", "--data", str(root), "--res", "32", "--near-duplicates", bad_rule)
        assert bad.returncode == 2 and f"near-duplicates {bad_rule} is out of range" in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
    out = cli(capsys, "data", "info", "--data", str(root), "--res", "32", "--near-duplicates", "10")
    assert out.returncode == 0, out.stderr
    assert "near-dups   1 groups of 2 images within 10 of 64 pHash bits" in out.stdout
    assert "Bulbasaur/00000023.jpg ~ Bulbasaur/copy.jpg" in out.stdout


# Pictures of the fixture that are one picture re-used (checked by eye): re-cropped or re-shaded, and more than
# 10 pHash bits apart. Every other pair of the 15 is two different pictures, most of them of one class.
REUSED = [{"Bulbasaur/00000023.jpg", "Bulbasaur/00000032.jpg"},  # the same art, cropped and shaded a little apart
          {"Bulbasaur/00000035.jpg", "Bulbasaur/5ecb491b17fa45278ced50c25dcecc3f.jpg"},  # one render, two crops
          {"Charmander/00000002.jpg", "Charmander/00000041.jpg"}]  # one line art, flat and painted


def _groups(data) -> list[set[str]]:
    return [set(g["paths"]) for g in data.near_groups]


def test_different_pictures_of_one_class_are_not_merged():
    data = prepare(str(PICTURES), 32, near_duplicates=10)
    assert data.manifest["near_duplicates"]["groups"] == 0, "the global hash misses the re-used ones"
    assert sum(len(data.sets[s][1]) for s in ("train", "val", "test")) == 15
    crops = prepare(str(PICTURES), 32)  # a folder's default: 10+crops
    assert sorted(map(sorted, _groups(crops))) == sorted(map(sorted, REUSED)), "those, and no different pictures"
    assert {g["found_by"] for g in crops.near_groups} == {"crops"}


def _rough_copy(src: Path, dest: Path, box: tuple[float, float, float, float] = (0, 0, 1, 1),
                background: tuple[int, int, int] | None = None) -> None:
    """A copy as another collection makes it: the near-white background repainted, cropped to `box`
    (fractions of the frame), rescaled to 128 x 128 and re-encoded as JPEG."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(src).convert("RGB")).copy()
    if background:
        pixels[(pixels > 235).all(axis=2)] = background
    img = Image.fromarray(pixels)
    w, h = img.size
    img = img.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))
    img.resize((128, 128), Image.Resampling.BILINEAR).save(dest, "JPEG", quality=75)


def test_a_tight_crop_and_a_new_background_are_grouped_with_their_originals(tmp_path: Path):
    root = _pictures(tmp_path / "pics", 5)
    _rough_copy(root / "Squirtle" / "00000029.jpg", root / "Squirtle" / "half.jpg", box=(0.35, 0.15, 0.85, 0.65))
    _rough_copy(root / "Squirtle" / "00000048.jpg", root / "Squirtle" / "blue.jpg", background=(40, 90, 200))
    exact = prepare(str(root), 32, near_duplicates=10)
    assert not any("Squirtle/half.jpg" in g for g in _groups(exact)), "the global hash misses a crop to half"
    data = prepare(str(root), 32)
    assert sorted(map(sorted, _groups(data))) == sorted(map(sorted, [
        *REUSED, {"Squirtle/00000029.jpg", "Squirtle/half.jpg"}, {"Squirtle/00000048.jpg", "Squirtle/blue.jpg"}]))
    ds = load(str(root), 32)
    for original, copy in [("00000029.jpg", "half.jpg"), ("00000048.jpg", "blue.jpg")]:
        images = [ds.images[ds.paths.index(f"Squirtle/{name}")] for name in (original, copy)]
        assert _split_of(data, images[0]) == _split_of(data, images[1])
    assert data.manifest["near_duplicates"]["threshold"] == "10+crops", "the rule that changed the split"


def test_data_info_json_lists_every_near_duplicate_group_and_the_text_stays_short(tmp_path: Path, capsys):
    root = _pictures(tmp_path / "pics", 5)
    out = cli(capsys, "data", "info", "--data", str(root), "--res", "32", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert sorted(map(sorted, (g["paths"] for g in info["near_duplicate_groups"]))) == sorted(map(sorted, REUSED))
    assert info["near_duplicates"]["groups"] == 3 and info["near_duplicates"]["crop_groups"] == 3
    text = cli(capsys, "data", "info", "--data", str(root), "--res", "32")
    assert text.returncode == 0, text.stderr
    line = next(x for x in text.stdout.splitlines() if x.startswith("near-dups"))
    assert "3 groups of 6 images within 10 of 64 pHash bits or one picture cropped (3 groups only so)" in line
    assert len(text.stdout.splitlines()) < 20


def test_the_rule_enters_the_identity_only_where_the_crop_matcher_changed_something(tmp_path: Path):
    from pokestudy.study import record, spec

    root = tmp_path / "pics"
    once = {"Bulbasaur/00000032.jpg", "Bulbasaur/00000035.jpg", "Charmander/00000041.jpg"}  # one of each REUSED
    for d in PICTURES.iterdir():  # no picture twice: the crop matcher leaves this data alone
        (root / d.name).mkdir(parents=True)
        for f in sorted(d.iterdir()):
            if f"{d.name}/{f.name}" not in once:
                (root / d.name / f.name).write_bytes(f.read_bytes())
    study = spec.load("smoke")
    identity = {rule: record.identity(study, prepare(str(root), 32, near_duplicates=rule).manifest)["digest"]
                for rule in (10, "10+crops", 0)}
    assert identity[10] == identity["10+crops"] != identity[0]
    _rough_copy(root / "Squirtle" / "00000029.jpg", root / "Squirtle" / "half.jpg", box=(0.1, 0.3, 0.6, 0.8))
    assert (record.identity(study, prepare(str(root), 32, near_duplicates="10+crops").manifest)["digest"]
            != record.identity(study, prepare(str(root), 32, near_duplicates=10).manifest)["digest"])
    with pytest.raises(UserError, match="the crop matcher needs a folder"):
        prepare("synthetic:classes=3,per_class=6,size=16", 32, near_duplicates="4+crops")


def test_a_spec_names_the_rule_and_a_bad_one_is_one_line():
    from pokestudy.study import spec

    text = "name: s\ndata: {{source: synthetic, near_duplicates: {}}}\nfactors: {{arch: [cnn]}}\nseeds: [0]\n"
    assert spec.parse(text.format("10+crops"), "s.yaml").data.near_duplicates == "10+crops"
    assert spec.parse(text.format('"8"'), "s.yaml").data.near_duplicates == 8
    for bad in ("40", "ten", "10+crop"):
        message = rf"s.yaml: data.near_duplicates: .*near-duplicates {re.escape(bad)} is out of range"
        with pytest.raises(UserError, match=message):
            spec.parse(text.format(bad), "s.yaml")


def test_a_crop_of_a_training_picture_is_left_out_of_an_outside_set(tmp_path: Path):
    from tests.conftest import jpeg

    train = _pictures(tmp_path / "train", 5)
    outside = tmp_path / "outside" / "squirtle"
    outside.mkdir(parents=True)
    _rough_copy(train / "Squirtle" / "00000029.jpg", outside / "half.jpg", box=(0.2, 0.2, 0.7, 0.7))
    (outside / "new.jpg").write_bytes(jpeg((60, 120, 200), seed=3))  # a picture the training data lacks
    data = prepare(str(train), 32, evals={"outside": str(tmp_path / "outside")})
    info = data.manifest["evals"]["outside"]
    assert (info["images"], info["near_copies_of_training_images"], info["found_only_by_crops"]) == (1, 1, 1)
    assert data.manifest["near_duplicates"]["threshold"] == "10+crops"
    again = prepare(str(train), 32, evals={"outside": str(tmp_path / "outside")})  # from the cached match
    assert again.manifest["evals"]["outside"] == info


def test_classes_too_small_to_split_are_trained_on_only_and_none_splittable_is_one_line(tmp_path: Path, capsys):
    from tests.conftest import jpeg

    root = _pictures(tmp_path / "pics", 5)
    (root / "Mew").mkdir()
    (root / "Mew" / "only.jpg").write_bytes(jpeg((120, 60, 200), seed=5))
    assert prepare(str(root), 32).manifest["train_only"] == ["Mew"]
    one = _pictures(tmp_path / "one", 1)  # one picture per class: nothing to validate or test on
    out = cli(capsys, "train", "--arch", "cnn", "--data", str(one), "--res", "32", "--width", "4", "--epochs", "1")
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert "too few pictures to split" in out.stderr and "Bulbasaur (1), Charmander (1), Squirtle (1)" in out.stderr


def test_near_copies_of_training_images_are_removed_from_an_outside_set_and_counted(tmp_path: Path):
    train = _pictures(tmp_path / "train", 4)
    outside = tmp_path / "outside" / "bulbasaur"  # matched to Bulbasaur by its normalised name
    outside.mkdir(parents=True)
    _near_copy(train / "Bulbasaur" / "00000023.jpg", outside / "near.jpg")
    (outside / "same.jpg").write_bytes((train / "Bulbasaur" / "00000032.jpg").read_bytes())
    (outside.parent / "charmander").mkdir()  # a fifth Charmander, not in training and no re-use of one there
    fifth = PICTURES / "Charmander" / "6aae1272d0a9464a967749a0eb8ef008.jpg"
    (outside.parent / "charmander" / "new.jpg").write_bytes(fifth.read_bytes())
    data = prepare(str(train), 32, evals={"outside": str(tmp_path / "outside")}, near_duplicates=10)
    info = data.manifest["evals"]["outside"]
    assert (info["images"], info["copies_of_training_images"], info["near_copies_of_training_images"]) == (1, 1, 1)
    assert data.sets["outside"][1].tolist() == [data.classes.index("Charmander")]


def test_a_training_fraction_keeps_whole_groups_per_class_nested_and_leaves_val_and_test_alone():
    full = prepare("synthetic:classes=4,per_class=24,size=32", 32)
    parts = {f: full.keep_fraction(f, seed=1) for f in (0.25, 0.5, 1.0)}
    y = {f: p.sets["train"][1] for f, p in parts.items()}
    groups = {f: set(p.train_groups.tolist()) for f, p in parts.items()}
    assert groups[0.25] < groups[0.5] < groups[1.0], "one seed: each smaller share is part of the larger ones"
    assert torch.bincount(y[0.25]).min() >= 1 and len(y[0.25]) < len(y[0.5]) < len(y[1.0])
    for f, part in parts.items():
        for s in ("val", "test"):
            assert torch.equal(part.sets[s][0], full.sets[s][0])
        kept = part.train_groups
        assert all(int((kept == g).sum()) == int((full.train_groups == g).sum()) for g in groups[f]), "whole groups"
    assert groups[0.25] != {g for g in full.keep_fraction(0.25, seed=2).train_groups.tolist()}, "the seed draws"
