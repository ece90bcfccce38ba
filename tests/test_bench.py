"""`pokestudy bench`: a tiny invocation prints every measurement it promises, as JSON (its speed is not tested)."""

from __future__ import annotations

import json
import math

from tests.conftest import pokestudy

KEYS = {"data", "res", "arch", "device", "cores", "precision", "native_bf16", "reference_precision",
        "layouts_images_per_s", "layout", "engine_images_per_s", "reference_images_per_s", "speedup",
        "train_flops_per_image", "engine_flops_per_s", "matmul_flops_per_s", "flops_fraction", "study_wall_s",
        "ideal_s", "plain_loop_s", "study_overhead", "study_vs_loop", "first_epoch_s"}


def test_bench_prints_each_measurement_as_json():
    data = "synthetic:classes=4,per_class=24,size=32"  # ~67 training images: one batch of the reference loop's 64
    out = pokestudy("bench", "--data", data, "--res", "32", "--trials", "1", "--precision", "fp32", "--json",
                    timeout=900)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == KEYS
    assert (result["data"], result["res"], result["precision"]) == (data, 32, "fp32")
    assert result["layout"] in result["layouts_images_per_s"]
    ratios = ("speedup", "flops_fraction", "study_overhead", "study_vs_loop", "first_epoch_s")
    assert all(math.isfinite(result[k]) and result[k] > 0 for k in ratios), {k: result[k] for k in ratios}
