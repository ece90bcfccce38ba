"""One trial: train a model on prepared tensors to a plateau and report every epoch to a callback.

Knows nothing of Ray or Optuna: the study layer passes `on_epoch` and reads the returned
summary. Every metric is measured the same way (eval mode, no augmentation, whole split), so
`gap = train_acc - test_acc` compares like with like; the accuracy on augmented batches is a
separate number, `train_acc_augmented`.

Schedule and stopping rule agree, so no model stops mid-schedule at a high learning rate: a
linear warm-up, then the learning rate is held until training stalls (neither validation nor
clean train accuracy beat their best by `min_delta` for `patience` epochs), cut ×0.1 at each
stall, and training stops at the stall after the last of `lr_cuts` cuts. Such a trial is
*converged*; one that reaches the `epochs` cap first is not, and no verdict rests on it.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from pokestudy import UserError
from pokestudy.data import Prepared
from pokestudy.data.augment import POLICIES, copies
from pokestudy.models import MIN_RES, MODELS

Record = dict[str, float]
OPTIMIZERS = ("adamw", "sgd")


class Diverged(RuntimeError):
    """The loss became NaN or infinite: the trial stops at the end of that epoch and is recorded as
    failed with this message."""


@dataclass
class TrialConfig:
    arch: str = "cnn"
    width: int = 16
    res: int = 64
    augment: str = "none"
    offline_target: int = 150  # paper-offline: images per training class after expansion
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    dropout: float = 0.0
    label_smoothing: float = 0.0
    batch_size: int = 64
    train_fraction: float = 1.0  # share of each class's training groups kept (val and test unchanged)
    epochs: int = 60  # the cap: a trial that reaches it before the plateau rule stops it is not converged
    patience: int = 3  # epochs without progress that make a stall (lr cut, or stop after the last cut)
    lr_cuts: int = 2
    min_delta: float = 0.005  # accuracy gain that counts as progress (0.5 points)
    warmup: int = 1  # epochs of linear learning-rate warm-up
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), _KINDS[f.name]
            if not (isinstance(value, kind) and not isinstance(value, bool) or value is None and f.default is None):
                raise UserError(f"setting {f.name} must be {_KIND_NAMES[kind]}, got {value!r}")
        checks = [
            (self.arch in MODELS, f"unknown arch {self.arch!r}; choose one of {', '.join(MODELS)}"),
            (self.augment in POLICIES, f"unknown augmentation {self.augment!r}; choose one of {', '.join(POLICIES)}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"),
            (MIN_RES <= self.res <= 1024, f"resolution {self.res} is out of range for the models; use {MIN_RES}..1024"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (0 < self.train_fraction <= 1, f"train_fraction must be in (0, 1], got {self.train_fraction}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.width >= 1 and self.batch_size >= 2 and self.epochs >= 1,
             "width >= 1, batch size >= 2 and epochs >= 1 are required"),
            (self.patience >= 1 and self.lr_cuts >= 0 and self.warmup >= 0 and self.min_delta >= 0,
             "patience >= 1, lr_cuts >= 0, warmup >= 0 and min_delta >= 0 are required"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @classmethod
    def from_dict(cls, values: dict) -> "TrialConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"unknown trial setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
        return cls(**values)


_KINDS = {f.name: {"int": int, "float": (int, float), "str": str}[f.type.split(" |")[0]] for f in fields(TrialConfig)}
_KIND_NAMES = {int: "an integer", (int, float): "a number", str: "a string"}


class Plateau:
    """The learning-rate schedule and the stopping rule in one place, so they cannot disagree.

    `factor()` gives the learning-rate factor for the next optimizer step (warm-up, then the cuts);
    `epoch_end()` reads the epoch's clean train and validation accuracy and says whether to stop.
    """

    def __init__(self, cfg: TrialConfig, steps_per_epoch: int):
        self.cfg, self.warm_steps, self.steps = cfg, cfg.warmup * steps_per_epoch, 0
        self.scale, self.cuts, self.stalled = 1.0, 0, 0
        self.best = {"train_acc": -1.0, "val_acc": -1.0}
        self.converged = False

    def factor(self) -> float:
        self.steps += 1
        return self.scale * min(1.0, self.steps / self.warm_steps if self.warm_steps else 1.0)

    def epoch_end(self, record: Record) -> bool:
        progress = False
        for k in self.best:
            if record[k] > self.best[k] + self.cfg.min_delta:
                progress = True
            self.best[k] = max(self.best[k], record[k])
        self.stalled = 0 if progress else self.stalled + 1
        if self.stalled < self.cfg.patience:
            return False
        self.stalled = 0
        if self.cuts < self.cfg.lr_cuts:
            self.cuts, self.scale = self.cuts + 1, self.scale * 0.1
            return False
        self.converged = True
        return True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no GPU is visible; use --device cpu")
    return device


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    By default large activations are mmap-ed and unmapped every step, so each step page-faults
    its way through fresh memory: with this, a CNN or ResNet training step on 2 CPU threads ran
    1.2-1.4x faster here. A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass


def memory_format(model: torch.nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last: the fast layout of oneDNN on CPU (~1.4x for a training step here) and of
    tensor cores on GPU. Not on CPU for a model with a strided 1x1 conv of under 16 input channels
    (a narrow ResNet): oneDNN's kernel for that case hangs or returns wrong gradients in this
    layout (uxlfoundation/oneDNN#6035; reproduced with torch 2.14 at width 4 and 6)."""
    narrow = any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
                 and m.in_channels < 16 for m in model.modules())
    return torch.contiguous_format if device.type == "cpu" and narrow else torch.channels_last


def _normalise(x: torch.Tensor, layout: torch.memory_format) -> torch.Tensor:
    """float [0, 1] → model input."""
    return ((x - 0.5) / 0.25).contiguous(memory_format=layout)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             batch: int = 256) -> tuple[float, float, torch.Tensor]:
    """Accuracy, mean loss and predictions over a whole set, in eval mode (batches of 256: larger
    ones spill the CPU caches and run slower)."""
    model.eval()
    layout, loss, preds = memory_format(model, device), 0.0, []
    for xb, yb in zip(x.split(batch), y.split(batch)):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(_normalise(xb.to(device, non_blocking=True).float() / 255, layout)).float()
        loss += F.cross_entropy(logits, yb.to(device), reduction="sum").item()
        preds.append(logits.argmax(1).cpu())
    pred = torch.cat(preds)
    return (pred == y).float().mean().item(), loss / len(y), pred


def run_trial(cfg: TrialConfig, data: Prepared, on_epoch: Callable[[Record], None] | None = None) -> dict:
    """Train one model; return the final record, the best-validation-epoch record and the history.

    Every augmentation policy takes the same number of optimizer steps per epoch (one pass over
    the *original* training split): offline expansion changes what the model sees, not how long
    it trains, so policies are compared at equal compute.
    """
    device = resolve_device(cfg.device)
    keep_freed_memory()
    data = data.keep_fraction(cfg.train_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    x_train, y_train = data.sets["train"]
    batch = min(cfg.batch_size, len(y_train))
    steps = len(y_train) // batch
    policy = POLICIES[cfg.augment]
    x_pool, y_pool = x_train.to(device), y_train.to(device)
    if policy.offline:
        sources = [data.sets[s] for s in (("train", "val", "test") if policy.leak else ("train",))]
        x_new, y_new = copies(torch.cat([x for x, _ in sources]).to(device), torch.cat([y for _, y in sources]).to(device),
                              policy.offline, cfg.offline_target, gen)
        x_pool, y_pool = torch.cat([x_pool, x_new]), torch.cat([y_pool, y_new])

    model = MODELS[cfg.arch](len(data.classes), cfg.width, cfg.res, cfg.dropout)
    layout = memory_format(model, device)
    model = model.to(device, memory_format=layout)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay,
                              fused=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    plateau = Plateau(cfg, steps)

    history: list[Record] = []
    best: Record | None = None
    test_pred = torch.empty(0)
    start, train_seconds = time.perf_counter(), 0.0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        tick = time.perf_counter()
        order = torch.randperm(len(y_pool), generator=gen, device=device)[: steps * batch]
        correct, losses = torch.zeros((), device=device), torch.empty(steps, device=device)
        for step, idx in enumerate(order.view(steps, batch)):
            x = x_pool[idx].float() / 255
            if policy.online:
                x = policy.online(x, gen)
            x = _normalise(x, layout)
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y_pool[idx], label_smoothing=cfg.label_smoothing)
            losses[step] = loss.detach()  # checked once per epoch: no GPU sync per step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for group in opt.param_groups:
                group["lr"] = cfg.lr * plateau.factor()
            opt.step()
            correct += (logits.argmax(1) == y_pool[idx]).sum()
        train_seconds += time.perf_counter() - tick
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if bad:
            raise Diverged(f"loss became {losses[bad[0]].item()} at epoch {epoch}, step {bad[0] + 1} (lr={cfg.lr}); "
                           "lower the learning rate")

        record: Record = {"epoch": epoch, "lr": opt.param_groups[0]["lr"],
                          "train_acc_augmented": correct.item() / (steps * batch)}
        for name, (x, y) in data.sets.items():
            acc, loss_value, pred = evaluate(model, x, y, device)
            record[f"{name}_acc"], record[f"{name}_loss"] = acc, loss_value
            test_pred = pred if name == "test" else test_pred
            if name != "train":
                record[f"{name}_gap"] = record["train_acc"] - acc
        record["gap"] = record.pop("test_gap")
        record.pop("val_gap")
        record["train_images"] = len(y_train)
        record["images_per_s"] = epoch * steps * batch / train_seconds
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if best is None or record["val_acc"] > best["val_acc"]:
            best = record
        if plateau.epoch_end(record):
            break
    return {"config": asdict(cfg), "final": history[-1], "best": best, "history": history,
            "converged": plateau.converged, "test_predictions": test_pred.tolist()}
