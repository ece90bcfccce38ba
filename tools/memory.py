"""Resident memory per trial (issue 22: one copy of the data per node).

Runs `pokestudy run` on a synthetic dataset large enough to see (10 classes x 1000 images at 128 px:
~490 MB of uint8) with 2 and then 4 trials at once, samples every trial worker's memory from
/proc/PID/smaps_rollup while it runs, and prints per run the dataset's size and each trial's peak
private memory (what it holds on its own; pages of Ray's object store it reads are shared) and peak RSS.

    python tools/memory.py [--concurrent 2 4] [--per-class 1000] [--size 128]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SPEC = """name: memory
question: How much memory does each trial hold?
data: {{source: "synthetic:classes=10,per_class={per_class},size={size}", res: {size}}}
factors:
  arch: [cnn]
  augment: [none]
fixed: {{width: 8, epochs: 2, steps_per_epoch: 4, batch_size: 32, lr: 0.01, eval_subset: 256}}
replicates: {trials}
resources: {{cpus: {cpus}}}
"""


def workers() -> list[int]:
    """The pids of Ray trial workers now running (their process title names the trainable)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ray::ImplicitFunc" in line]


def memory(pid: int) -> dict[str, int]:
    """kB by smaps_rollup field: Rss, Pss, Private_Clean, Private_Dirty, ..."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":")
        fields[name] = int(value.split()[0])
    return fields


def sample(peaks: dict[int, dict[str, int]], done: threading.Event) -> None:
    others = set(workers())  # another study's trials, already running: not this run's
    while not done.is_set():
        for pid in set(workers()) - others:
            try:
                m = memory(pid)
            except (OSError, ValueError):
                continue
            peak = peaks.setdefault(pid, {"private": 0, "rss": 0})
            peak["private"] = max(peak["private"], m["Private_Clean"] + m["Private_Dirty"])
            peak["rss"] = max(peak["rss"], m["Rss"])
        time.sleep(0.25)


def measure(concurrent: int, per_class: int, size: int, folder: Path) -> list[dict[str, int]]:
    spec = folder / f"memory-{concurrent}.yaml"
    spec.write_text(SPEC.format(per_class=per_class, size=size, trials=2 * concurrent, cpus=2 / concurrent))
    peaks: dict[int, dict[str, int]] = {}
    done = threading.Event()
    thread = threading.Thread(target=sample, args=(peaks, done), daemon=True)
    thread.start()
    out = subprocess.run([sys.executable, "-m", "pokestudy", "run", "--study", str(spec), "--results",
                          str(folder / f"results-{concurrent}"), "--max-concurrent", str(concurrent)],
                         capture_output=True, text=True)
    done.set()
    thread.join()
    if out.returncode:
        sys.exit(out.stderr[-2000:])
    return sorted(peaks.values(), key=lambda p: -p["private"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    data_mb = 10 * args.per_class * 3 * args.size ** 2 / 2 ** 20
    print(f"dataset: {10 * args.per_class} images at {args.size} px = {data_mb:.0f} MB of uint8")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("POKESTUDY_CACHE", str(Path(tmp) / "cache"))
        for k in args.concurrent:
            peaks = measure(k, args.per_class, args.size, Path(tmp))
            mb = [f"{p['private'] / 1024:.0f}" for p in peaks]
            rss = [f"{p['rss'] / 1024:.0f}" for p in peaks]
            print(f"{k} trials at once: peak private MB per trial worker {', '.join(mb)}; peak RSS {', '.join(rss)}")


if __name__ == "__main__":
    main()
