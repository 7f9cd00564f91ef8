"""scripts/gpu_check.sh --dry-run: the GPU check's code (bf16 parity, the 2-layer decode benchmark and its
bandwidth floor) with tiny shapes on CPU, through the same shell entry point the GPU run uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_dry_run_passes_and_writes_every_result(tmp_path):
    env = os.environ | {"PYTHON": sys.executable}
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "gpu_check_dry_run.json").read_text())
    assert result["passed"] and result["dry_run"] and result["device"] == "cpu" and result["dtype"] == "bfloat16"
    parity = result["parity"]
    assert parity["tokens_equal"] or parity["mismatches_are_near_ties"]
    assert parity["max_rel_error"] <= parity["tolerance"]
    decode = result["decode"]
    assert [p["batch"] for p in decode["points"]] == list(decode["shapes"]["batches"]) == [1, 4]
    # the dry-run shapes: D 64, F 128, 2 layers, 8 experts top-2, 4 heads / 2 KV heads of 16, bf16 (2 bytes);
    # 16 context tokens + 1 warm-up step + half of the 3 timed steps
    attention, router, kv_row = 2 * (64 * (4 + 2 * 2) * 16 + 4 * 16 * 64), 2 * 64 * 8, 2 * 2 * 2 * 16
    for point in decode["points"]:
        b, touched = point["batch"], point["experts_touched_per_layer"]
        assert point["context_len"] == 18
        assert point["mixserve_step_s"] > 0 and point["transformers_step_s"] > 0
        assert point["speedup_vs_transformers"] * point["mixserve_step_s"] == pytest.approx(
            point["transformers_step_s"])
        nbytes = point["bytes_per_step"]
        assert (nbytes["attention"], nbytes["router"], nbytes["kv_cache"]) == (2 * attention, 2 * router,
                                                                               2 * kv_row * b * 18)
        assert nbytes["experts"] == int(2 * touched * 3 * 64 * 128) * 2
        assert nbytes["total"] == nbytes["attention"] + nbytes["router"] + nbytes["kv_cache"] + nbytes["experts"]
        assert point["floor_s"] * decode["copy_bandwidth_bytes_per_s"] == pytest.approx(nbytes["total"])
        assert point["first_step_rel_error"] < 5e-2
    one, four = decode["points"]
    assert one["experts_touched_per_layer"] == 2.0, "one token a step routes to exactly its top 2"
    assert 2.0 <= four["experts_touched_per_layer"] <= 8.0
