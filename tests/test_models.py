"""Both architectures build from the registry and classify at every resolution the study may use."""

import pytest
import torch

from pokestudy.models import MODELS

pytestmark = pytest.mark.fast  # the edit-test loop: `pytest -m fast`


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("res", [32, 64, 96, 224])
def test_output_shape(arch: str, res: int):
    model = MODELS[arch](num_classes=7, width=4, res=res, dropout=0.2).eval()
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
