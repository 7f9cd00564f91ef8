"""`mixserve generate` as a user runs it: a subprocess printing one JSON object; `mixserve bench` help and errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from cluster.engine import LLMEngine
from cluster.requests import GenerationRequest
from workers.runtime.local_build import build_attention_rank

ROOT = Path(__file__).resolve().parents[2]


def _mixserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def test_generate_json_with_token_ids_matches_engine(tiny8, tmp_path):
    model = tmp_path / "no_tokenizer"
    shutil.copytree(tiny8, model)
    assert not (model / "tokenizer.json").exists()
    proc = _mixserve("generate", "--model", str(model), "--token-ids", "5,9,200,3", "--max-new-tokens", "6",
                     "--temperature", "0", "--ignore-eos", "--json", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    rank = build_attention_rank(model, dtype=torch.float32, device=torch.device("cpu"), num_blocks=64, block_size=16)
    (expected,) = LLMEngine(rank).generate(
        [GenerationRequest(request_id="x", prompt_token_ids=(5, 9, 200, 3), max_new_tokens=6, ignore_eos=True)]
    )
    assert out["token_ids"] == expected.token_ids and len(out["token_ids"]) == 6
    assert out["text"] is None
    compiled = _mixserve("generate", "--model", str(model), "--token-ids", "5,9,200,3", "--max-new-tokens", "6",
                         "--temperature", "0", "--ignore-eos", "--json", "--threads", "1", "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert json.loads(compiled.stdout)["token_ids"] == expected.token_ids


def test_compile_without_a_cxx_compiler_says_so(tiny8, tmp_path):
    env = {"CXX": str(tmp_path / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = _mixserve("generate", "--model", str(tiny8), "--token-ids", "5,9", "--max-new-tokens", "2", "--compile",
                     "--json", "--threads", "1", env=env)
    assert proc.returncode == 2 and proc.stderr.startswith("mixserve: error: compile_small_steps"), proc.stderr
    assert "compile_small_steps: torch.compile failed" in proc.stderr and "C++ compiler" in proc.stderr


def test_generate_reports_bad_input_clearly(tiny8):
    proc = _mixserve("generate", "--model", str(tiny8), "--token-ids", "5,99999", "--json")
    assert proc.returncode == 2
    assert "prompt_token_ids" in proc.stderr and "99999" in proc.stderr
    proc = _mixserve("generate", "--model", str(tiny8), "--prompt", "hello")
    assert proc.returncode == 2 and "tokenizer.json" in proc.stderr
    proc = _mixserve("generate", "--model", "/nonexistent", "--token-ids", "1")
    assert proc.returncode == 2 and "config.json" in proc.stderr


def test_redundant_experts_are_checked_before_ray_starts(tiny8):
    """Issue 22: copies live on expert workers, and the workers must be able to hold them."""
    proc = _mixserve("generate", "--model", str(tiny8), "--token-ids", "1", "--redundant-experts", "2")
    assert proc.returncode == 2 and "redundant_experts (2) are copies on expert workers" in proc.stderr, proc.stderr
    proc = _mixserve("generate", "--model", str(tiny8), "--token-ids", "1", "--workers", "10",
                     "--redundant-experts", "1")
    assert proc.returncode == 2, proc.stderr
    assert "num_workers (10) exceeds num_experts (8) + redundant_experts (1)" in proc.stderr
    proc = _mixserve("generate", "--model", str(tiny8), "--token-ids", "1", "--workers", "2",
                     "--redundant-experts", "9")
    assert proc.returncode == 2 and "redundant_experts (9) exceeds 8" in proc.stderr, proc.stderr
    assert "--redundant-experts" in _mixserve("serve", "--help").stdout


def test_bench_is_listed_and_its_help_shows_the_defaults():
    top = _mixserve("--help")
    assert top.returncode == 0 and "bench" in top.stdout and "mixserve bench --help" in top.stdout
    bench = _mixserve("bench", "--help")
    assert bench.returncode == 0 and "offline" in bench.stdout and "make-model" in bench.stdout
    offline = _mixserve("bench", "offline", "--help")
    assert offline.returncode == 0, offline.stderr
    assert "(default: 32)" in offline.stdout and "(default: 128)" in offline.stdout  # output and input length
    bad = _mixserve("bench", "serve", "--concurrency", "x")
    assert bad.returncode == 2 and "comma-separated integers" in bad.stderr
