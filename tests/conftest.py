"""Shared fixtures: a private data cache, a messy Kaggle-style folder, one local Ray per session."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

# The trials the tests train in this process get one thread, as each trial of a study gets on Ray (resources.cpus:
# 1). torch's default, a thread per core, bought nothing for these tiny models on an idle machine and made them
# ~10x slower beside other work (a study running on both cores took the fast tier from ~1.5 to ~10 minutes).
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tests never touch the user's cache; the sprites tarball is reused from it when present."""
    cache = tmp_path_factory.mktemp("cache")
    user_npm = Path(os.environ.get("POKESTUDY_CACHE", Path.home() / ".cache" / "pokestudy")) / "npm"
    if user_npm.is_dir():
        (cache / "npm").symlink_to(user_npm)
    os.environ["POKESTUDY_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (128, 128), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour) + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """A Kaggle-style PokemonData/ folder with every messy case design.md §3 names."""
    root = tmp_path / "PokemonData"
    for c, colour in enumerate([(220, 40, 40), (40, 200, 60), (40, 60, 220)]):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(8):
            (d / f"{i}.jpg").write_bytes(jpeg(colour, seed=c * 100 + i))
    a = root / "class0"
    (a / "lying.asp").write_bytes(jpeg((200, 50, 50), seed=7001))  # a JPEG whose extension lies
    (a / "leftover.png.sb-4a1b").write_bytes(png(Image.new("RGB", (90, 90), (210, 30, 30))))
    (a / "odd.jpg')").write_bytes(jpeg((230, 20, 20), seed=7002))
    (a / "vector.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    (a / "vector-named.png").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    (a / "truncated.jpg").write_bytes(jpeg((200, 0, 0), seed=7003)[:300])
    (a / "copy.jpg").write_bytes((a / "0.jpg").read_bytes())  # byte-identical duplicate
    b = root / "class1"
    (b / "palette.png").write_bytes(png(Image.new("RGB", (64, 64), (30, 220, 60)).convert("P")))
    (b / "gray.png").write_bytes(png(Image.new("L", (300, 120), 128)))
    rgba = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    rgba.paste((40, 210, 70, 255), (20, 20, 80, 80))
    (b / "rgba.png").write_bytes(png(rgba))
    (b / "huge.png").write_bytes(png(Image.new("RGB", (1400, 1100), (50, 190, 60))))
    (b / "bomb.png").write_bytes(png(Image.new("1", (9000, 8000))))
    tiny = root / "tiny"
    tiny.mkdir()
    (tiny / "only.jpg").write_bytes(jpeg((120, 120, 0), seed=9))
    return root


def pokestudy(*args: str, cwd: Path | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run the real command line, as a user would."""
    return subprocess.run([sys.executable, "-m", "pokestudy", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, **kw)


def cli(capsys: pytest.CaptureFixture, *args: str) -> subprocess.CompletedProcess:
    """The command line in-process: `pokestudy.cli.main`, the console script's own entry point, without the
    seconds of imports a new process costs (the fast tier's way; `pokestudy` runs it as a shell would)."""
    from pokestudy.cli import main

    capsys.readouterr()  # only this command's output is returned
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["pokestudy", *args], code, out.out, out.err)


@pytest.fixture(scope="session")
def smoke_run(ray_local, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The smoke study, run once for the session: (storage URL, results directory)."""
    from pokestudy.report import trial_figure
    from pokestudy.study import runner, spec

    results = tmp_path_factory.mktemp("smoke")
    url = f"sqlite:///{results / 'pokestudy.db'}"
    runner.run_study(spec.load("smoke"), storage=url, results=results, study_name="smoke", trial_figure=trial_figure)
    return url, results
