"""Import rules of DESIGN.md that import-linter cannot express (it treats external packages whole, and sees
imports, not what a command loads). Cycles and imports of cluster.bench are import-linter contracts."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_model_math_and_config_never_touch_torch_distributed():
    files = [ROOT / "workers" / "config.py", *sorted((ROOT / "workers" / "model").rglob("*.py"))]
    offenders = {
        str(f.relative_to(ROOT)): sorted(m for m in _imported_modules(f) if m.startswith("torch.distributed"))
        for f in files
    }
    assert not {f: m for f, m in offenders.items() if m}, "workers.model/config must stay free of torch.distributed"
    assert len(files) > 5


def test_only_workers_comm_and_runtime_use_torch_distributed_in_workers():
    allowed = {"comm", "runtime"}
    for path in (ROOT / "workers").rglob("*.py"):
        parts = path.relative_to(ROOT / "workers").parts
        if any(m.startswith("torch.distributed") for m in _imported_modules(path)):
            assert parts[0] in allowed, f"{path} imports torch.distributed outside workers/comm and workers/runtime"


def test_the_serving_entry_point_loads_no_bench_module():
    """`mixserve serve`, `generate` and `client` start from cluster.cli; only `mixserve bench` loads the bench."""
    probe = ("import sys, cluster.cli, cluster.serve, cluster.gateway.server; "
             "print(sorted(m for m in sys.modules if m.startswith('cluster.bench')))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
