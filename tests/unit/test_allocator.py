"""MallocSettings: a large op's freed output is reused (no new page faults), by mallopt or by environment, from a
worker thread as a rank's TorchThread allocates; with glibc's defaults every round faults its pages again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster.allocator import MallocSettings

# A SwiGLU over 96 MiB of rows on a new thread, twelve times (each op returns 48 MiB, above glibc's adaptive
# mmap ceiling of 32 MiB); prints the minor page faults of the last four rounds (the first few warm the heap).
_PROBE = """
import resource, sys, threading
import torch
import torch.nn.functional as F
from cluster.allocator import MallocSettings
if sys.argv[1] == "mallopt":
    assert MallocSettings().apply_now(), "mallopt refused a setting"
torch.set_num_threads(1)
faults = []
def rounds():
    rows = torch.ones(4096, 6144)
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out = F.silu(rows[:, :3072]) * rows[:, 3072:]
        del out
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(sum(faults[-4:]))
"""
PAGES_PER_ROUND = 48 * 2**20 // os.sysconf("SC_PAGE_SIZE")


def _later_round_faults(mode: str, extra_env: dict[str, str]) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | extra_env
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, timeout=120,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_glibc_defaults_fault_every_round_in():
    faults = _later_round_faults("defaults", {})
    assert faults > 3 * PAGES_PER_ROUND, f"{faults} faults over 4 rounds of {PAGES_PER_ROUND} pages: already reused?"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
@pytest.mark.parametrize("mode", ["mallopt", "environment"])
def test_settings_reuse_freed_memory(mode: str):
    env = MallocSettings().env_vars() if mode == "environment" else {}
    faults = _later_round_faults(mode, env)
    assert faults < PAGES_PER_ROUND // 2, f"{faults} faults over 4 rounds of {PAGES_PER_ROUND} pages: memory not reused"


def test_env_vars_name_glibcs_variables():
    env = MallocSettings(mmap_threshold_bytes=1 << 20, arena_max=2).env_vars()
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20) and env["MALLOC_ARENA_MAX"] == "2"
    assert set(env) == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX"}


@pytest.mark.parametrize("field", ["mmap_threshold_bytes", "trim_threshold_bytes", "top_pad_bytes", "arena_max"])
def test_out_of_range_settings_name_the_field(field: str):
    with pytest.raises(ValueError, match=field):
        MallocSettings(**{field: 2**31})
    with pytest.raises(ValueError, match=field):
        MallocSettings(**{field: 0})
