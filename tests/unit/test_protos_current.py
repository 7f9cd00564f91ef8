"""The generated protobuf code in protos/ is what `python -m protos.generate` makes from mixserve.proto."""

from __future__ import annotations

from pathlib import Path

from protos.generate import generate

PROTOS = Path(__file__).resolve().parents[2] / "protos"


def test_generated_code_is_current(tmp_path):
    generate(tmp_path)
    generated = sorted(p.relative_to(tmp_path / "protos") for p in (tmp_path / "protos").glob("mixserve_pb2*"))
    assert [str(p) for p in generated] == ["mixserve_pb2.py", "mixserve_pb2.pyi", "mixserve_pb2_grpc.py"]
    for name in generated:
        assert (PROTOS / name).read_text() == (tmp_path / "protos" / name).read_text(), (
            f"protos/{name} is stale: run `make protos`"
        )
