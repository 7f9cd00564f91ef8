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
    assert [p["batch"] for p in decode["points"]] == list(decode["shapes"]["batches"])
    for point in decode["points"]:
        assert point["mixserve_step_s"] > 0 and point["transformers_step_s"] > 0
        speedup = point["transformers_step_s"] / point["mixserve_step_s"]
        assert point["speedup_vs_transformers"] == pytest.approx(speedup)
        assert point["bytes_per_step"]["total"] == sum(v for k, v in point["bytes_per_step"].items() if k != "total")
        floor = point["bytes_per_step"]["total"] / decode["copy_bandwidth_bytes_per_s"]
        assert point["floor_s"] == pytest.approx(floor)
        assert 1 <= point["experts_touched_per_layer"] <= decode["shapes"]["num_experts"]
        assert point["first_step_rel_error"] < 5e-2
