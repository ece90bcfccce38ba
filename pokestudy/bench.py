"""`pokestudy bench`: speed claims as ratios measured in one run, on one machine.

a. the trial engine vs the report author's loop (ImageFolder + PIL transforms + DataLoader);
b. the engine's achieved FLOP/s as a fraction of a float32 matmul measured here;
c. a study's wall time through Ray Tune vs the ideal (trial time / parallel slots) and vs a plain loop;
d. seconds from `pokestudy run` to the first finished epoch, with a warm data cache.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from pokestudy.data import Prepared, prepare
from pokestudy.models import MODELS
from pokestudy.train import TrialConfig, run_trial


def reference_images_per_s(data: Prepared, cfg: TrialConfig, workdir: Path, limit: int = 1024) -> float:
    """The seed's way: JPEG files on disk, torchvision ImageFolder, PIL transforms, DataLoader."""
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
    model = MODELS[cfg.arch](len(data.classes), cfg.width, cfg.res)
    opt = torch.optim.AdamW(model.parameters(), cfg.lr)
    model.train()
    seen, start = 0, time.perf_counter()
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(yb)
    return seen / (time.perf_counter() - start)


def flops_per_image(data: Prepared, cfg: TrialConfig) -> float:
    """Training FLOPs (forward + backward) per image, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = MODELS[cfg.arch](len(data.classes), cfg.width, cfg.res)
    x = torch.randn(cfg.batch_size, 3, cfg.res, cfg.res)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(cfg.batch_size, dtype=torch.long)).backward()
    return counter.get_total_flops() / cfg.batch_size


def matmul_flops(n: int = 1024, repeat: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n**3 * repeat / (time.perf_counter() - start)


def _spec(path: Path, name: str, data: str, res: int, cfg: TrialConfig, seeds: int) -> Path:
    spec = {"name": name, "question": "bench", "data": {"source": data, "res": res},
            "factors": {"arch": [cfg.arch]}, "seeds": list(range(seeds)),
            "fixed": {"width": cfg.width, "epochs": cfg.epochs, "batch_size": cfg.batch_size}}
    path.write_text(yaml.safe_dump(spec))
    return path


def study_overhead(data_spec: str, data: Prepared, cfg: TrialConfig, workdir: Path, trials: int) -> dict:
    """The same `trials` short trials through Ray Tune (2 slots of 1 CPU) and in a plain loop."""
    import optuna

    from pokestudy.study import runner, spec

    study = spec.load(str(_spec(workdir / "overhead.yaml", "overhead", data_spec, cfg.res, cfg, trials)))
    url = f"sqlite:///{workdir / 'bench.db'}"
    start = time.perf_counter()
    runner.run(study, storage=url, results=workdir, study_name="overhead")
    wall = time.perf_counter() - start
    seconds = [t.user_attrs["seconds"] for t in optuna.load_study(study_name="overhead", storage=url).get_trials()]
    slots = min(trials, int(os.cpu_count() or 1) // int(study.resources.cpus) or 1)
    start = time.perf_counter()
    for work in study.trials():
        run_trial(TrialConfig.from_dict(work.settings), data)
    loop = time.perf_counter() - start
    return {"study_wall_s": wall, "ideal_s": sum(seconds) / slots, "plain_loop_s": loop,
            "study_overhead": wall / (sum(seconds) / slots), "study_vs_loop": wall / loop}


def first_epoch_seconds(data_spec: str, cfg: TrialConfig, workdir: Path) -> float:
    """Wall time from launching `pokestudy run` to the first epoch stored in Optuna (warm cache)."""
    path = _spec(workdir / "first.yaml", "first", data_spec, cfg.res, cfg, 1)
    db = workdir / "first" / "pokestudy.db"
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
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()


def run(data_spec: str, res: int, arch: str = "cnn", trials: int = 4) -> dict:
    data = prepare(data_spec, res)
    cfg = TrialConfig(arch=arch, res=res, augment="paper", epochs=2)
    engine = run_trial(cfg, data)["final"]["images_per_s"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reference = reference_images_per_s(data, cfg, tmp / "imagefolder")
        flops = flops_per_image(data, cfg)
        roof = matmul_flops()
        overhead = study_overhead(data_spec, data, TrialConfig(arch=arch, res=res, epochs=1), tmp, trials)
        first = first_epoch_seconds(data_spec, TrialConfig(arch=arch, res=res, epochs=1), tmp)
    return {"data": data_spec, "res": res, "arch": arch, "threads": torch.get_num_threads(),
            "engine_images_per_s": engine, "reference_images_per_s": reference, "speedup": engine / reference,
            "train_flops_per_image": flops, "engine_flops_per_s": flops * engine, "matmul_flops_per_s": roof,
            "flops_fraction": flops * engine / roof, **overhead, "first_epoch_s": first}
