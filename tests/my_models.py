"""A user's own models, as a user's file would hold them: builders that follow `pokestudy.models`' contract,
and broken ones that the bad-input tests expect to be refused in one line."""

from __future__ import annotations

import json

from torch import nn


def tiny(num_classes: int, res: int, depth: int = 1, width: int = 8, log: str = "") -> nn.Module:
    """`depth` conv + ReLU blocks of `width` channels, global pooling, a linear head. With `log` (a file
    path) every call appends the settings it received, so a test can see what reached the builder."""
    assert isinstance(depth, int) and depth >= 1, f"depth {depth!r}"
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"num_classes": num_classes, "res": res, "depth": depth, "width": width}) + "\n")
    layers: list[nn.Module] = []
    for cin in [3] + [width] * (depth - 1):
        layers += [nn.Conv2d(cin, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def raises(num_classes: int, res: int) -> nn.Module:
    raise ValueError("this builder is broken\nand says so on two lines")


def ten_classes(num_classes: int, res: int) -> nn.Module:
    """Ignores num_classes: the wrong output shape."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))


def not_a_module(num_classes: int, res: int) -> str:
    return "a model"


def no_res(num_classes: int) -> nn.Module:
    """Breaks the contract: no `res` argument."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, num_classes))


class _Sized(nn.Module):
    """Refuses input of any other size than the resolution it was built for."""

    def __init__(self, num_classes: int, res: int):
        super().__init__()
        self.res, self.head = res, nn.Linear(3, num_classes)

    def forward(self, x):
        if x.shape[-2:] != (self.res, self.res):
            raise ValueError(f"built for {self.res} px, given {tuple(x.shape[-2:])}")
        return self.head(x.mean((2, 3)))


def sized(num_classes: int, res: int) -> nn.Module:
    """A model that fails its trial unless the trial's images are at the resolution it was built for."""
    return _Sized(num_classes, res)
