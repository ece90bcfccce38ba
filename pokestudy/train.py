"""One trial: train a model on prepared tensors for a fixed budget and report every epoch to a callback.

Knows nothing of Ray or Optuna: the study layer passes `on_epoch` and reads the returned
summary. Every metric is measured the same way (eval mode, no augmentation), so
`gap = train_acc - test_acc` compares like with like; the accuracy on augmented batches is a
separate number, `train_acc_augmented`.

`precision: bf16` runs the forward pass and the loss under bfloat16 autocast, in training and in
evaluation, with fp32 master weights; `fp32` runs no autocast. What `auto` becomes
(`default_precision`: bf16 where the hardware has it natively, else fp32) is resolved once, when the study is created.

The learning rate follows a schedule fixed in advance (`Schedule`: warm-up, then decay to 0 over
the budget) that reads nothing measured, so every condition of a study trains with the same
learning rate at the same step. (An earlier stopping rule cut the rate when accuracy stalled; it
cut on noise for augmented models only, a confound aligned with the factor under test.) Whether
the budget was *enough* is checked afterwards on the finished curve (`settled`), never used to
change the training.
"""

from __future__ import annotations

import ctypes
import math
import time
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pokestudy import UserError, models
from pokestudy.data import Prepared, check_res
from pokestudy.data.augment import POLICIES, copies

Record = dict[str, float]
Precision = Literal["fp32", "bf16"]
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of CPUs that compute bf16 natively
CPUINFO = Path("/proc/cpuinfo")

MODEL_PREFIX = "model."  # a spec's name for one of the model's own settings: `model.depth`


class Diverged(RuntimeError):
    """The loss became NaN or infinite: the trial stops at the end of that epoch and is recorded as
    failed with this message."""


class TrialConfig(BaseModel):
    """Every setting of one trial, validated like a study spec (a mistake is one `UserError` line)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "cnn"  # a built-in, torchvision:NAME or package.module:function (see `pokestudy.models`)
    model: dict[str, models.Setting] = {}  # the arch's own settings (`model.NAME` in a spec): its builder's kwargs
    width: int = Field(16, ge=1)
    res: int = 64
    augment: str = "none"
    offline_target: int = Field(150, ge=1)  # paper-offline: images per training class after expansion
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)  # the peak learning rate, reached at the end of the warm-up
    weight_decay: float = Field(0.0, ge=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(64, ge=2)
    train_fraction: float = Field(1.0, gt=0, le=1)  # share of each class's training groups (val, test unchanged)
    epochs: int = Field(30, ge=1)  # the budget: every trial trains exactly this many epochs
    steps_per_epoch: int = Field(0, ge=0)  # 0: one pass over the (original) training split; N: N optimizer steps
    warmup: int = Field(1, ge=0)  # epochs of linear learning-rate warm-up
    decay: Literal["cosine", "linear"] = "cosine"  # after warm-up, down to 0 at the end of the budget
    settle: float = Field(0.02, gt=0, lt=1)  # converged: smoothed accuracies rose less than this in the last quarter
    eval_subset: int = Field(512, ge=0)  # before the last quarter, clean train accuracy on this many images (0: all)
    seed: int = 0
    device: str = "auto"
    precision: Precision = "fp32"  # bf16: autocast forward and loss, fp32 weights

    def __init__(self, **values: object) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise UserError(_one_line(e)) from None

    @field_validator("arch")
    @classmethod
    def _an_arch(cls, v: str) -> str:
        """One of the registry's forms; whether it builds is `check_model`'s question (it imports user code)."""
        if not models.known_form(v):
            raise ValueError(f"unknown arch {v!r}; {models.CHOICES}")
        return v

    @field_validator("augment")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in POLICIES:
            raise ValueError(f"unknown augmentation {v!r}; choose one of {', '.join(POLICIES)}")
        return v

    @model_validator(mode="after")
    def _settings_reach_the_model(self) -> "TrialConfig":
        """width and dropout shape the built-ins only, and `model` settings every other arch: refuse a
        setting the arch would ignore."""
        if self.arch in models.MODELS and self.model:
            raise UserError(f"the built-in arch {self.arch} takes no model settings (model.{next(iter(self.model))}); "
                            "it takes the trial settings width and dropout")
        ignored = [f"{k}={getattr(self, k)}" for k in ("width", "dropout")
                   if self.arch not in models.MODELS and getattr(self, k) != type(self).model_fields[k].default]
        if ignored:
            raise UserError(f"setting {', '.join(ignored)} shapes only the built-in archs (cnn, resnet); arch "
                            f"{self.arch} takes its own settings as model.NAME")
        return self

    def builder_settings(self) -> dict[str, models.Setting]:
        """The arch's builder's keyword arguments beside num_classes and res."""
        return {"width": self.width, "dropout": self.dropout} if self.arch in models.MODELS else dict(self.model)

    def check_model(self) -> None:
        """Build the model once on a zero batch: an arch that cannot be imported or built is one line."""
        models.check(self.arch, self.res, self.builder_settings())

    @field_validator("res")
    @classmethod
    def _res_in_range(cls, v: int) -> int:
        check_res(v)  # the package's one resolution bound, with its one message
        return v

    @classmethod
    def from_dict(cls, values: dict) -> "TrialConfig":
        """From a spec's settings, where each of the model's own settings is spelled `model.NAME`."""
        own = {k[len(MODEL_PREFIX):]: v for k, v in values.items() if k.startswith(MODEL_PREFIX)}
        rest = {k: v for k, v in values.items() if not k.startswith(MODEL_PREFIX)}
        if own:
            rest["model"] = {**rest.get("model", {}), **own}
        return cls(**rest)

    def as_dict(self) -> dict:
        return self.model_dump()


def _one_line(e: ValidationError) -> str:
    """A pydantic error as the one line a user reads: which setting, what is wrong."""
    err = e.errors()[0]
    name = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        known = ", ".join(sorted(TrialConfig.model_fields))
        return f"unknown trial setting {name}; known: {known}"
    return f"setting {name}: {err['msg'].removeprefix('Value error, ')}"


class Schedule:
    """The learning-rate factor at each optimizer step: a linear warm-up over `warmup` epochs, then a
    cosine or linear decay that reaches 0 at the end of the budget. A pure function of the step and the
    config: nothing measured can move it, so no condition gets a shorter high-learning-rate phase."""

    def __init__(self, cfg: TrialConfig, steps_per_epoch: int):
        self.total = cfg.epochs * steps_per_epoch
        self.warm = min(cfg.warmup * steps_per_epoch, self.total - 1)
        self.cosine = cfg.decay == "cosine"

    def __call__(self, step: int) -> float:
        """The factor for optimizer step `step` (1-based)."""
        if step <= self.warm:
            return step / self.warm
        t = (step - self.warm - 1) / (self.total - self.warm)  # 0 at the first decay step, < 1 at the last
        return 0.5 * (1 + math.cos(math.pi * t)) if self.cosine else 1 - t


def quarter(epochs: int) -> tuple[int, int]:
    """The convergence check's windows: it compares the mean over the last `w` epochs with the mean over
    the `w` epochs that end a quarter of the budget (`q` epochs) earlier. Returns (q, w)."""
    q = max(1, epochs // 4)
    return q, min(3, q)


def settled(history: list[Record], settle: float) -> dict[str, float]:
    """How much clean train and validation accuracy still rose over the last quarter of the budget, on a
    curve smoothed by `quarter`'s window: {"train_acc_rise", "val_acc_rise", "converged" (1.0 or 0.0)}.
    A budget that was enough leaves both flat; a rise of `settle` or more says it was too short."""
    q, w = quarter(len(history))
    if len(history) < q + w:
        rises = {f"{k}_rise": math.nan for k in ("train_acc", "val_acc")}
        return {**rises, "converged": 0.0}
    rises = {f"{k}_rise": sum(r[k] for r in history[-w:]) / w - sum(r[k] for r in history[-q - w:-q]) / w
             for k in ("train_acc", "val_acc")}
    return {**rises, "converged": float(all(v < settle for v in rises.values()))}


def cpu_has_bf16(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo text lists a bf16 instruction set (AVX-512 BF16, AMX): without one, bf16 is
    emulated and a training step runs no faster than in fp32, usually slower."""
    flags = next((line.partition(":")[2].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` computes bf16 in hardware: a CUDA GPU that says so (emulation does not count), a
    Linux CPU with a flag of `BF16_CPU_FLAGS`; False anywhere else (no /proc/cpuinfo: unknown, so no)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind != "cpu":
        return False
    try:
        return cpu_has_bf16(CPUINFO.read_text())
    except OSError:
        return False


def default_precision(device: torch.device | str) -> Precision:
    """What `precision: auto` becomes for trials on `device`: bf16 where the hardware computes it natively,
    fp32 elsewhere (emulated bf16 runs slower than fp32). The `precision` study found bf16 equivalent to
    fp32 within ±2 points on test accuracy and the gap, averaged over both archs (results/precision), and
    its trials ran 1.5-2x faster on a CPU with AVX-512 BF16."""
    return "bf16" if native_bf16(device) else "fp32"


def autocast(device: torch.device, precision: Precision) -> torch.autocast:
    """The forward pass and loss of one precision: bf16 autocast, or none for fp32."""
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


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
             precision: Precision = "fp32", batch: int = 256) -> tuple[float, float, torch.Tensor]:
    """Accuracy, mean loss and predictions over a whole set, in eval mode, in the trial's precision
    (batches of 256: larger ones spill the CPU caches and run slower)."""
    model.eval()
    layout, loss, preds = memory_format(model, device), 0.0, []
    for xb, yb in zip(x.split(batch), y.split(batch)):
        with autocast(device, precision):
            logits = model(_normalise(xb.to(device, non_blocking=True).float() / 255, layout)).float()
        loss += F.cross_entropy(logits, yb.to(device), reduction="sum").item()
        preds.append(logits.argmax(1).cpu())
    pred = torch.cat(preds)
    return (pred == y).float().mean().item(), loss / len(y), pred


def run_trial(cfg: TrialConfig, data: Prepared, on_epoch: Callable[[Record], None] | None = None) -> dict:
    """Train one model for `cfg.epochs`; return the final record, the best-validation-epoch record, the
    history and the convergence check (`settled`).

    Every augmentation policy takes the same number of optimizer steps per epoch (one pass over the
    *original* training split, or `steps_per_epoch`): offline expansion changes what the model sees, not
    how long it trains, so policies are compared at equal compute.
    """
    device = resolve_device(cfg.device)
    keep_freed_memory()
    data = data.keep_fraction(cfg.train_fraction, cfg.seed).at_res(cfg.res)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    x_pool, y_pool = _training_pool(cfg, data, device, gen)
    n_train = len(data.sets["train"][1])
    batch = min(cfg.batch_size, n_train)
    steps = cfg.steps_per_epoch or n_train // batch
    model = models.build(cfg.arch, len(data.classes), cfg.res, cfg.builder_settings())
    layout = memory_format(model, device)
    model = model.to(device, memory_format=layout)
    opt = _optimizer(cfg, model)
    schedule = Schedule(cfg, steps)
    q, w = quarter(cfg.epochs)
    subset = _train_subset(data, cfg.eval_subset)
    near_copy = data.near_copy  # once per trial: which test images have a near copy in its training split

    history: list[Record] = []
    test_pred = torch.empty(0)
    start, train_seconds = time.perf_counter(), 0.0
    for epoch in range(1, cfg.epochs + 1):
        tick = time.perf_counter()
        order = _order(len(y_pool), steps * batch, gen, device)
        augmented = _train_epoch(cfg, model, opt, schedule, (epoch - 1) * steps, x_pool, y_pool,
                                 order.view(steps, batch), layout, gen)
        train_seconds += time.perf_counter() - tick
        exact = epoch > cfg.epochs - q - w  # the convergence check and the final numbers read whole sets
        record, test_pred = _measure(model, data, device, cfg.precision, None if exact else subset, near_copy)
        record = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_acc_augmented": augmented, **record,
                  "train_images": n_train, "steps": epoch * steps,
                  "images_per_s": epoch * steps * batch / train_seconds,
                  "seconds": time.perf_counter() - start}
        history.append(record)
        if on_epoch:
            on_epoch(record)
    check = settled(history, cfg.settle)
    best = max(history, key=lambda r: r["val_acc"])
    final = {**history[-1], "train_acc_rise": check["train_acc_rise"], "val_acc_rise": check["val_acc_rise"]}
    return {"config": cfg.as_dict(), "final": final, "best": best, "history": history,
            "converged": bool(check["converged"]), "test_predictions": test_pred.tolist()}


def _training_pool(cfg: TrialConfig, data: Prepared, device: torch.device,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The images batches are drawn from: the training split, plus the offline copies of the policy."""
    x_train, y_train = data.sets["train"]
    x_pool, y_pool = x_train.to(device), y_train.to(device)
    policy = POLICIES[cfg.augment]
    if policy.offline:
        sources = [data.sets[s] for s in (("train", "val", "test") if policy.leak else ("train",))]
        x_all, y_all = (torch.cat([pair[i] for pair in sources]).to(device) for i in (0, 1))
        x_new, y_new = copies(x_all, y_all, policy.offline, cfg.offline_target, gen)
        x_pool, y_pool = torch.cat([x_pool, x_new]), torch.cat([y_pool, y_new])
    return x_pool, y_pool


def _optimizer(cfg: TrialConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay,
                               fused=True)
    return torch.optim.AdamW(model.parameters(), cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def _order(pool: int, needed: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """`needed` indices into the pool: whole shuffled passes, as many as `steps_per_epoch` asks for."""
    passes = -(-needed // pool)
    return torch.cat([torch.randperm(pool, generator=gen, device=device) for _ in range(passes)])[:needed]


def _train_epoch(cfg: TrialConfig, model: torch.nn.Module, opt: torch.optim.Optimizer, schedule: Schedule,
                 done: int, x_pool: torch.Tensor, y_pool: torch.Tensor, batches: torch.Tensor,
                 layout: torch.memory_format, gen: torch.Generator) -> float:
    """One epoch of optimizer steps (`done` steps came before); returns the accuracy on the augmented
    batches. The loss is checked once per epoch, so a GPU never syncs per step."""
    model.train()
    policy = POLICIES[cfg.augment]
    device = x_pool.device
    correct, losses = torch.zeros((), device=device), torch.empty(len(batches), device=device)
    for step, idx in enumerate(batches):
        x = x_pool[idx].float() / 255
        if policy.online:
            x = policy.online(x, gen)
        x = _normalise(x, layout)
        with autocast(device, cfg.precision):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y_pool[idx], label_smoothing=cfg.label_smoothing)
        losses[step] = loss.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = cfg.lr * schedule(done + step + 1)
        opt.step()
        correct += (logits.argmax(1) == y_pool[idx]).sum()
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        epoch = done // len(batches) + 1
        raise Diverged(f"loss became {losses[bad[0]].item()} at epoch {epoch}, step {bad[0] + 1} (lr={cfg.lr}); "
                       "lower the learning rate")
    return correct.item() / batches.numel()


def _train_subset(data: Prepared, size: int) -> torch.Tensor | None:
    """A fixed sample of training images (the same in every epoch and trial of a split) on which the
    curves' early epochs measure clean train accuracy; None when the whole split is as small."""
    n = len(data.sets["train"][1])
    if size == 0 or size >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:size].sort().values


def _measure(model: torch.nn.Module, data: Prepared, device: torch.device, precision: Precision,
             subset: torch.Tensor | None, near_copy: torch.Tensor | None) -> tuple[Record, torch.Tensor]:
    """Accuracy and loss on every evaluation set, the gaps to clean train accuracy, and the test
    predictions. With `subset`, train accuracy is measured on those images only (`train_eval_n` says on
    how many), which is enough to draw a curve at a fraction of the cost. With `near_copy` (a mask over
    the test set), test accuracy is also split into the images with a near copy in train (`near_copy_acc`,
    on `near_copy_n` images) and the rest (`far_acc`): their difference is what the copies inflate."""
    record: Record = {}
    test_pred = torch.empty(0)
    for name, (x, y) in data.sets.items():
        if name == "train" and subset is not None:
            x, y = x[subset], y[subset]
        acc, loss_value, pred = evaluate(model, x, y, device, precision)
        record[f"{name}_acc"], record[f"{name}_loss"] = acc, loss_value
        if name == "train":
            record["train_eval_n"] = len(y)
        if name == "test":
            test_pred = pred
            if near_copy is not None:
                record["near_copy_n"] = int(near_copy.sum())
                for part, mask in (("near_copy", near_copy), ("far", ~near_copy)):
                    if mask.any():  # a part with no image has no accuracy; it is left out, never 0
                        record[f"{part}_acc"] = (pred[mask] == y[mask]).float().mean().item()
    for name in data.sets:
        if name not in ("train", "val"):
            record["gap" if name == "test" else f"{name}_gap"] = record["train_acc"] - record[f"{name}_acc"]
    return record, test_pred
