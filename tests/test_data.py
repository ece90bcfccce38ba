"""Data: messy folders, the sprites package, synthetic data, the cache and the splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pokestudy import UserError
from pokestudy.data import load, prepare
from pokestudy.data.split import split
from tests.conftest import pokestudy

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
def test_bad_folders_are_refused_without_writing_a_cache(tmp_path: Path, private_cache: Path, problem: str, message: str):
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


def test_synthetic_is_deterministic():
    a, b = load("synthetic:classes=4,per_class=6,size=16", 32), load("synthetic:classes=4,per_class=6,size=16", 32)
    assert torch.equal(a.images, b.images) and a.manifest["images"] == 24


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
    ds = load(str(messy_folder), 32)
    assert len(set(ds.hashes)) == len(ds.hashes)


def test_sprites_source_has_gen1_animations_grouped_and_the_artwork_set():
    ds = prepare("sprites", 32)
    m = ds.manifest
    assert m["classes"] == 151 and len(ds.classes) == 151 and ds.classes[24] == "pikachu"
    assert m["per_class"]["median"] >= 25
    x, y = ds.sets["artwork"]
    assert len(y) == 151 and x.shape[1:] == (3, 32, 32)
    assert set(ds.sets) == {"train", "val", "test", "artwork"}


def test_data_info_json(messy_folder: Path):
    out = pokestudy("data", "info", "--data", str(messy_folder), "--res", "32", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["classes"] == 4 and info["images"] == 32 and len(info["duplicates"]) == 1
    assert {s["path"] for s in info["skipped"]} >= {"class0/vector.svg", "class0/truncated.jpg"}
    assert sum(info["splits"].values()) == 32 and Path(info["cache"]).is_file()


def test_the_same_bytes_under_two_classes_are_a_label_conflict_and_neither_copy_is_used(messy_folder: Path):
    original = messy_folder / "class2" / "3.jpg"
    (messy_folder / "class1" / "stray.jpg").write_bytes(original.read_bytes())
    out = pokestudy("data", "info", "--data", str(messy_folder), "--res", "32")
    assert out.returncode == 0, out.stderr
    assert "conflicts   1" in out.stdout and "class2/3.jpg = class1/stray.jpg" in out.stdout.replace(
        "class1/stray.jpg = class2/3.jpg", "class2/3.jpg = class1/stray.jpg")
    ds = load(str(messy_folder), 32)
    assert ds.manifest["conflicts"] == [{"classes": ["class1", "class2"], "paths": ["class1/stray.jpg", "class2/3.jpg"]}]
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


def test_a_recropped_rescaled_reencoded_copy_is_a_near_duplicate_and_lands_in_its_originals_split(tmp_path: Path):
    root = _pictures(tmp_path / "pics", 4)
    _near_copy(root / "Bulbasaur" / "00000023.jpg", root / "Bulbasaur" / "copy.jpg")
    ds = load(str(root), 32)
    original, copy = ds.paths.index("Bulbasaur/00000023.jpg"), ds.paths.index("Bulbasaur/copy.jpg")
    assert ds.hashes[original] != ds.hashes[copy], "not the same bytes: the exact-bytes rule cannot see it"
    straddled = 0
    for seed in range(8):
        near = prepare(str(root), 32, split_seed=seed)  # a folder's default: within 10 of 64 bits
        summary = near.manifest["near_duplicates"]
        assert (summary["threshold"], summary["groups"], summary["images"]) == (10, 1, 2)
        assert _split_of(near, ds.images[original]) == _split_of(near, ds.images[copy])
        exact = prepare(str(root), 32, split_seed=seed, near_duplicates=0)
        apart = _split_of(exact, ds.images[original]) != _split_of(exact, ds.images[copy])
        assert summary["straddled_exact_split"] == int(apart)
        straddled += apart
    assert straddled, "under the exact-bytes rule the copy straddles a split for some seed"
    bad = pokestudy("data", "info", "--data", str(root), "--res", "32", "--near-duplicates", "-1")
    assert bad.returncode == 2 and "near-duplicates threshold -1 is out of range" in bad.stderr
    out = pokestudy("data", "info", "--data", str(root), "--res", "32")
    assert out.returncode == 0, out.stderr
    assert "near-dups   1 groups of 2 images within 10 of 64 bits" in out.stdout
    assert "Bulbasaur/00000023.jpg ~ Bulbasaur/copy.jpg" in out.stdout


def test_different_pictures_of_one_class_are_not_merged():
    data = prepare(str(PICTURES), 32, near_duplicates=10)
    assert data.manifest["near_duplicates"]["groups"] == 0
    assert sum(len(data.sets[s][1]) for s in ("train", "val", "test")) == 15


def test_near_copies_of_training_images_are_removed_from_an_outside_set_and_counted(tmp_path: Path):
    train = _pictures(tmp_path / "train", 4)
    outside = tmp_path / "outside" / "bulbasaur"  # matched to Bulbasaur by its normalised name
    outside.mkdir(parents=True)
    _near_copy(train / "Bulbasaur" / "00000023.jpg", outside / "near.jpg")
    (outside / "same.jpg").write_bytes((train / "Bulbasaur" / "00000032.jpg").read_bytes())
    held_out = sorted((PICTURES / "Bulbasaur").iterdir())[4]  # a fifth picture, not in training
    (outside / "new.jpg").write_bytes(held_out.read_bytes())
    data = prepare(str(train), 32, evals={"outside": str(tmp_path / "outside")})
    info = data.manifest["evals"]["outside"]
    assert (info["images"], info["copies_of_training_images"], info["near_copies_of_training_images"]) == (1, 1, 1)
    assert data.sets["outside"][1].tolist() == [data.classes.index("Bulbasaur")]


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
