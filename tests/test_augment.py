"""Augmentation policies act on batches of tensors: online per batch, offline once."""

import pytest
import torch

from pokestudy.data.augment import POLICIES, copies, paper

pytestmark = pytest.mark.fast  # the edit-test loop: `pytest -m fast`


def _batch(n: int = 8) -> torch.Tensor:
    x = torch.ones(n, 3, 32, 32)
    x[:, :, 4:12, 4:20] = 0.0  # an off-centre dark block: any flip or rotation moves it
    return x


def test_paper_transforms_each_image_differently_and_keeps_the_white_background():
    x = _batch()
    out = paper(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert not torch.allclose(out, x)
    assert len({tuple(o.flatten()[::37].tolist()) for o in out}) > 1, "a fresh draw per image"
    assert out[:, :, 0, 0].min() > 0.95, "corners uncovered by rotation are white"
    assert abs(out.mean().item() - x.mean().item()) < 0.05, "no content is invented or lost"


def test_paper_is_reproducible_from_the_generator():
    x = _batch()
    a = paper(x, torch.Generator().manual_seed(3))
    b = paper(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_offline_copies_grow_every_class_to_the_target():
    images = (_batch(10) * 255).to(torch.uint8)
    labels = torch.tensor([0] * 3 + [1] * 7)
    x, y = copies(images, labels, paper, 20, torch.Generator().manual_seed(0))
    assert torch.bincount(torch.cat([labels, y])).tolist() == [20, 20]
    assert x.dtype == torch.uint8 and len(x) == len(y) == 30
    assert not torch.equal(x[0], images[0])


def test_policies_registry():
    assert set(POLICIES) >= {"none", "paper", "paper-offline"}
    assert POLICIES["paper"].online and not POLICIES["paper"].offline
    assert POLICIES["paper-offline"].offline and not POLICIES["paper-offline"].online
