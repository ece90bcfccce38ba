"""Models from one registry: the report's two architectures, any torchvision classifier, or the user's own.

An `arch` names a builder: a built-in (`cnn`, `resnet`), `torchvision:NAME` (a `torchvision.models`
classification builder, made with `weights=None`: nothing is ever downloaded) or `package.module:function`
(a callable in the user's code, imported from the current directory or an installed package). The contract:

    builder(num_classes=K, res=R, **settings) -> nn.Module

called with keyword arguments, where `settings` are the model's own (`model.NAME` in a spec; the built-ins
take the trial settings `width` and `dropout`). The module maps a float batch (N, 3, R, R), normalised
images, to (N, K) logits, in train and in eval mode. `check` builds each arch once before a study starts,
so a mistake is one line then, not a failed trial later.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import nn

from pokestudy import UserError
from pokestudy.imports import failure, is_path, resolve


def conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)]


def cnn(num_classes: int, width: int = 16, res: int = 64, dropout: float = 0.0) -> nn.Module:
    """5 blocks of conv → BN → ReLU → max-pool, flattened into one linear layer (as in the report).

    Channels double up to 8x width; the flatten head makes the classifier grow with resolution,
    which is part of why this model can memorise.
    """
    chans = [3] + [width * m for m in (1, 2, 4, 8, 8)]
    layers: list[nn.Module] = []
    for cin, cout in zip(chans, chans[1:]):
        layers += [*conv_bn(cin, cout), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    side = res // 32
    return nn.Sequential(*layers, nn.Flatten(), nn.Dropout(dropout), nn.Linear(chans[-1] * side * side, num_classes))


class Residual(nn.Module):
    """conv → BN → ReLU → conv → BN, plus the input (projected where the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, stride), nn.ReLU(inplace=True), *conv_bn(cout, cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def resnet(num_classes: int, width: int = 16, res: int = 64, dropout: float = 0.0) -> nn.Module:
    """A stride-2 stem, then 4 residual stages (width x 1, 2, 4, 8), global pooling, linear head."""
    chans = [width * m for m in (1, 2, 4, 8)]
    stages = [Residual(cin, cout, 1 if i == 0 else 2) for i, (cin, cout) in enumerate(zip([width] + chans, chans))]
    return nn.Sequential(*conv_bn(3, width, 2), nn.ReLU(inplace=True), *stages,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(chans[-1], num_classes))


Builder = Callable[..., nn.Module]
Setting = str | int | float | bool
MODELS: dict[str, Builder] = {"cnn": cnn, "resnet": resnet}  # the built-ins
MIN_RES = 32  # five 2x poolings need at least 32 px: the bound for data, specs and trials alike
TORCHVISION = "torchvision:"
CHOICES = "choose cnn, resnet, torchvision:NAME (e.g. torchvision:resnet18) or package.module:function"
PROBE_CLASSES = 5  # the class count `check` builds with: unlikely to be one a builder hard-codes


def known_form(arch: str) -> bool:
    """Whether `arch` has one of the registry's forms (`torchvision:NAME` is one of `package.module:function`'s);
    checked without importing anything."""
    return arch in MODELS or is_path(arch)


def builder(arch: str) -> Builder:
    """The builder `arch` names (imports the user's module for `package.module:function`)."""
    if arch in MODELS:
        return MODELS[arch]
    if arch.startswith(TORCHVISION):
        return _torchvision(arch[len(TORCHVISION):])
    if is_path(arch):
        return resolve(arch, "arch")
    raise UserError(f"unknown arch {arch!r}; {CHOICES}")


def build(arch: str, num_classes: int, res: int, settings: dict[str, Setting]) -> nn.Module:
    return builder(arch)(num_classes=num_classes, res=res, **settings)


def _torchvision(name: str) -> Builder:
    from torchvision import models as tv

    if name not in tv.list_models(module=tv):  # classification builders only (no detection, video, ...)
        raise UserError(f"unknown arch torchvision:{name}: torchvision has no classification model {name!r}; "
                        "`torchvision.models.list_models()` names them (e.g. resnet18, mobilenet_v3_small)")

    def build_torchvision(num_classes: int, res: int, **settings: Setting) -> nn.Module:
        """torchvision's builders take any resolution (adaptive pooling): `res` is not theirs."""
        if any(k.startswith("weights") for k in settings):
            raise UserError(f"arch torchvision:{name}: pokestudy builds with weights=None, never downloading; "
                            "remove the model.weights setting")
        return tv.get_model(name, weights=None, num_classes=num_classes, **settings)

    return build_torchvision


def check(arch: str, res: int, settings: dict[str, Setting]) -> None:
    """Refuse, in one line, an arch that cannot be imported, does not take `settings`, raises when built,
    or does not map a zero batch (2, 3, res, res) to (2, classes) logits in train and eval mode.
    Each distinct (arch, res, settings) is built once per process; the built-ins, tested at every
    resolution (tests/test_models.py), are not."""
    if arch not in MODELS:
        _check(arch, res, tuple(sorted(settings.items())))


@functools.lru_cache(maxsize=None)
def _check(arch: str, res: int, settings: tuple[tuple[str, Setting], ...]) -> None:
    fn, kwargs = builder(arch), dict(settings)
    _check_signature(arch, fn, kwargs)
    try:
        model = fn(num_classes=PROBE_CLASSES, res=res, **kwargs)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 — whatever the user's builder raises, one line
        called = ", ".join(f"{k}={v!r}" for k, v in [("num_classes", PROBE_CLASSES), ("res", res), *settings])
        raise UserError(f"arch {arch} failed to build ({called}): {failure(e)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"arch {arch} returned a {type(model).__name__}; a builder must return a torch.nn.Module")
    batch = torch.zeros(2, 3, res, res)
    with torch.no_grad():
        for mode in ("train", "eval"):
            model.train(mode == "train")
            try:
                out = model(batch)
            except Exception as e:  # noqa: BLE001
                raise UserError(f"arch {arch} failed on a batch of 2 at {res} px in {mode} mode: "
                                f"{failure(e)}") from None
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, PROBE_CLASSES):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise UserError(f"arch {arch} maps a batch (2, 3, {res}, {res}) to {got} in {mode} mode; expected "
                                f"(2, {PROBE_CLASSES}) logits for num_classes={PROBE_CLASSES}")


def _check_signature(arch: str, fn: Builder, settings: dict[str, Setting]) -> None:
    """Name what a builder's signature cannot take or lacks; a builder with **kwargs is left to its call."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some C-implemented callables have no signature
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not {"num_classes", "res"} <= set(takes):
        raise UserError(f"arch {arch} must take the keyword arguments num_classes and res "
                        "(the contract: builder(num_classes=K, res=R, **settings) -> nn.Module)")
    own = [f"model.{n}" for n in takes if n not in ("num_classes", "res")]
    unknown = [f"model.{k}" for k in settings if k not in takes]
    if unknown:
        raise UserError(f"arch {arch} takes no setting {', '.join(unknown)}; it takes {', '.join(own) or 'none'}")
    missing = [f"model.{n}" for n in takes
               if params[n].default is params[n].empty and n not in ("num_classes", "res", *settings)]
    if missing:
        raise UserError(f"arch {arch} needs the setting(s) {', '.join(missing)}; give them in the spec")

