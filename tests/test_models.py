"""Every kind of arch builds from the one registry and classifies at every resolution a study may use: the
built-ins, a torchvision model and a model defined in a user's file (`tests/my_models.py`)."""

import pytest
import torch

from pokestudy.models import MODELS, build, check

pytestmark = pytest.mark.fast  # the edit-test loop: `pytest -m fast`

ARCHS = [*sorted(MODELS), "torchvision:mobilenet_v3_small", "tests.my_models:tiny"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("res", [32, 64, 96, 224])
def test_output_shape(arch: str, res: int):
    settings = {"width": 4, "dropout": 0.2} if arch in MODELS else {}
    check(arch, res, settings)  # what a spec's load runs: build once, a zero batch in train and eval mode
    model = build(arch, 7, res, settings).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, res, res)).shape == (2, 7)


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_width_scales_parameters(arch: str):
    small, big = (sum(p.numel() for p in MODELS[arch](10, w, 64).parameters()) for w in (4, 8))
    assert big > 2 * small


def test_resnet_has_residual_stages_with_projections():
    from pokestudy.models import Residual

    blocks = [m for m in MODELS["resnet"](10, 8, 64).modules() if isinstance(m, Residual)]
    assert len(blocks) == 4
    assert isinstance(blocks[0].skip, torch.nn.Identity) and not isinstance(blocks[1].skip, torch.nn.Identity)
