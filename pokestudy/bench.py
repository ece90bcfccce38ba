"""`pokestudy bench`: speed claims as ratios measured in one run, on one machine.

a. the trial engine vs the report author's loop (ImageFolder + PIL transforms + DataLoader);
b. the engine's achieved FLOP/s as a fraction of a matmul measured here in the engine's precision
   (a bf16 engine against a bf16 roof, which on an AMX Xeon is ~3x the fp32 one: issue 22);
c. a study's wall time through Ray Tune vs the ideal (trial time / parallel slots) and vs a plain loop;
d. seconds from `pokestudy run` to the first finished epoch, with a warm data cache.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from pokestudy.data import Prepared, prepare
from pokestudy import models
from pokestudy.train import Precision, TrialConfig, default_precision, native_bf16, resolve_device, run_trial

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def reference_images_per_s(data: Prepared, cfg: TrialConfig, workdir: Path, limit: int = 1024) -> float:
    """The seed's way: JPEG files on disk, torchvision ImageFolder, PIL transforms, DataLoader;
    the model on the same device as the engine's, in fp32 as the report trained it (so a bf16 engine's
    speedup includes what bf16 buys)."""
    from PIL import Image
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    x, y = data.sets["train"]
    for i, (img, label) in enumerate(zip(x[:limit], y[:limit].tolist())):
        folder = workdir / f"{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).resize((128, 128)).save(folder / f"{i}.jpg", quality=95)
    tf = transforms.Compose([transforms.Resize((cfg.res, cfg.res)), transforms.RandomRotation(30, fill=255),
                             transforms.RandomHorizontalFlip(), transforms.RandomVerticalFlip(),
                             transforms.ToTensor(), transforms.Normalize(0.5, 0.25)])
    loader = DataLoader(datasets.ImageFolder(str(workdir), tf), batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    device = resolve_device(cfg.device)
    model = models.build(cfg.arch, len(data.classes), cfg.res, cfg.builder_settings()).to(device)
    opt = torch.optim.AdamW(model.parameters(), cfg.lr)
    model.train()
    seen, start = 0, time.perf_counter()
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(yb)
    loss.item()  # waits for a GPU to finish
    return seen / (time.perf_counter() - start)


def flops_per_image(data: Prepared, cfg: TrialConfig) -> float:
    """Training FLOPs (forward + backward) per image, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = models.build(cfg.arch, len(data.classes), cfg.res, cfg.builder_settings())
    x = torch.randn(cfg.batch_size, 3, cfg.res, cfg.res)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(cfg.batch_size, dtype=torch.long)).backward()
    return counter.get_total_flops() / cfg.batch_size


def matmul_flops(device: torch.device, precision: Precision = "fp32", n: int = 1024, repeat: int = 10,
                 windows: int = 5) -> float:
    """The roof: matmul FLOP/s in `precision`, the best of a few windows (a low roof would flatter the engine)."""
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[precision]) for _ in range(2))
    (a @ b).sum().item()
    best = float("inf")
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(repeat):
            c = a @ b
        c[0, 0].item()  # waits for a GPU to finish
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeat / best


def _spec(path: Path, name: str, data: str, res: int, cfg: TrialConfig, seeds: int) -> Path:
    """A one-condition study; on a GPU machine, four trials share each GPU."""
    spec = {"name": name, "question": "bench", "data": {"source": data, "res": res},
            "factors": {"arch": [cfg.arch]}, "seeds": list(range(seeds)),
            "resources": {"cpus": 1, "gpus": 0.25 if torch.cuda.is_available() else 0},
            "fixed": {"width": cfg.width, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                      "precision": cfg.precision}}
    path.write_text(yaml.safe_dump(spec))
    return path


def study_overhead(data_spec: str, data: Prepared, cfg: TrialConfig, workdir: Path, trials: int) -> dict:
    """The same `trials` short trials through Ray Tune (one slot per core, or 4 per GPU) and in a plain loop."""
    import optuna
    import ray

    from pokestudy.study import runner, spec
    from pokestudy.study.record import TrialRecord

    study = spec.load(str(_spec(workdir / "overhead.yaml", "overhead", data_spec, cfg.res, cfg, trials)))
    url = f"sqlite:///{workdir / 'bench.db'}"
    start = time.perf_counter()
    runner.run_study(study, storage=url, results=workdir, study_name="overhead")
    wall = time.perf_counter() - start
    ray.shutdown()  # the measurements after this one get the machine to themselves
    stored = optuna.load_study(study_name="overhead", storage=url).get_trials()
    seconds = [TrialRecord.from_trial(t).seconds for t in stored]
    gpus = study.resources.gpus
    slots = min(trials, int((os.cpu_count() or 1) // study.resources.cpus) or 1,
                int(torch.cuda.device_count() / gpus) if gpus else trials)
    start = time.perf_counter()
    for work in study.trials():
        run_trial(TrialConfig.from_dict(work.settings), data)
    loop = time.perf_counter() - start
    return {"study_wall_s": wall, "ideal_s": sum(seconds) / slots, "plain_loop_s": loop,
            "study_overhead": wall / (sum(seconds) / slots), "study_vs_loop": wall / loop}


def first_epoch_seconds(data_spec: str, cfg: TrialConfig, workdir: Path, launches: int = 3) -> float:
    """Wall time from launching `pokestudy run` to the first epoch stored in Optuna (warm cache),
    the median of a few launches: one launch varies by a few seconds with what else the machine does."""
    path = _spec(workdir / "first.yaml", "first", data_spec, cfg.res, cfg, 1)
    return statistics.median(_first_epoch(path, workdir / f"first-{i}" / "pokestudy.db") for i in range(launches))


def _first_epoch(path: Path, db: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pokestudy", "run", "--study", str(path),
                             "--results", str(db.parent)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while proc.poll() is None:
            if db.exists():
                try:
                    with sqlite3.connect(db, timeout=0.2) as con:
                        if con.execute("select count(*) from trial_intermediate_values").fetchone()[0]:
                            return time.perf_counter() - start
                except sqlite3.Error:
                    pass
            time.sleep(0.1)
        raise RuntimeError("the benchmark's `pokestudy run` ended before its first epoch")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        _wait_gone(proc.pid)


def _wait_gone(group: int, timeout: float = 30) -> None:
    """Wait until the run's Ray processes have exited, so that they do not slow the next launch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def _engine(cfg: TrialConfig, data_spec: str, threads: int) -> float:
    """One trial's training images/s, in a fresh process like a study's worker (warm data cache)."""
    torch.set_num_threads(threads)
    return run_trial(cfg, prepare(data_spec, cfg.res))["final"]["images_per_s"]


def _reference(cfg: TrialConfig, data_spec: str, threads: int) -> float:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        return reference_images_per_s(prepare(data_spec, cfg.res), cfg, Path(tmp))


def _images_per_s(fn, *args, copies: int = 1, repeats: int = 2) -> float:
    """Total images/s of `fn(*args)` run in `copies` fresh processes at once, the best of `repeats`
    tries (as timeit does: on a shared machine, other work only ever makes a try slower). Fresh
    processes: no allocator, thread or cache state carries over from one measurement to the next,
    and concurrent copies share the machine the way a study's trials do."""
    best = 0.0
    for _ in range(repeats):
        with multiprocessing.get_context("spawn").Pool(copies) as pool:
            best = max(best, sum(pool.starmap(fn, [args] * copies)))
    return best


def bench_precision(precision: str, device: torch.device) -> Precision:
    """`auto`: what a new study on this device would get (`train.default_precision`)."""
    return default_precision(device) if precision == "auto" else TrialConfig(precision=precision).precision


def measure(data_spec: str, res: int, arch: str = "cnn", trials: int = 8, precision: str = "auto") -> dict:
    device = resolve_device("auto")
    precision = bench_precision(precision, device)  # a bad one fails before the data is prepared
    data = prepare(data_spec, res)  # build the cache once, before the measurements
    cfg = TrialConfig(arch=arch, res=res, augment="paper", epochs=2 if device.type == "cpu" else 10,
                      precision=precision)
    cores = os.cpu_count() or 1
    if device.type == "cpu":  # the threads of one trial, or one trial per core: which trains more images?
        layouts = {f"1 trial x {cores} threads": _images_per_s(_engine, cfg, data_spec, cores),
                   f"{cores} trials x 1 thread": _images_per_s(_engine, cfg, data_spec, 1, copies=cores)}
    else:  # trials sharing one GPU
        layouts = {f"{n} trials per GPU": _images_per_s(_engine, cfg, data_spec, 1, copies=n) for n in (1, 2, 4)}
    layout, engine = max(layouts.items(), key=lambda item: item[1])
    reference = _images_per_s(_reference, cfg, data_spec, cores)
    flops = flops_per_image(data, cfg)
    torch.set_num_threads(cores)
    roof = matmul_flops(device, precision)
    short = TrialConfig(arch=arch, res=res, epochs=3, precision=precision)
    with tempfile.TemporaryDirectory() as tmp:
        overhead = study_overhead(data_spec, data, short, Path(tmp), trials)
        first = first_epoch_seconds(data_spec, short, Path(tmp))
    return {"data": data_spec, "res": res, "arch": arch, "device": str(device), "cores": cores,
            "precision": precision, "native_bf16": native_bf16(device), "reference_precision": "fp32",
            "layouts_images_per_s": layouts, "layout": layout,
            "engine_images_per_s": engine, "reference_images_per_s": reference, "speedup": engine / reference,
            "train_flops_per_image": flops, "engine_flops_per_s": flops * engine, "matmul_flops_per_s": roof,
            "flops_fraction": flops * engine / roof, **overhead, "first_epoch_s": first}
