"""`mixserve bench failover` end to end: 4 greedy streams over gRPC, an expert worker SIGKILLed in each of 2
rounds; every stream ends exactly, the report's timeline is ordered (detected before replayed before the next
token and SERVING) and names the one rank the restart replaced."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main


@pytest.mark.timeout(300)
def test_failover_timeline(ray_cluster, tiny8, tmp_path, capsys):
    argv = ["bench", "failover", "--model", str(tiny8), "--workers", "2", "--streams", "4", "--input-len", "6",
            "--output-len", "120", "--kill", "worker 0", "--kill-after-tokens", "4", "--rounds", "2",
            "--threads", "1", "--reserved-cpus", "0", "--no-progress", "--out", str(tmp_path / "f.json")]
    assert main(argv) == 0
    assert "next token s" in capsys.readouterr().out
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["mode"] == "failover" and report["workers"] == 2 and len(report["rounds"]) == 2
    for r in report["rounds"]:
        assert r["victim"] == "worker 0" and r["replaced"] == ["expert worker 0"], r
        assert (r["exact"], r["failed"], r["replayed"]) == (4, 0, 4), r
        assert 0 <= r["detected_s"] < r["replayed_s"] <= r["serving_s"], r
        assert r["detected_s"] < r["first_token_s"], r
        assert min(r["halt_s"], r["replace_s"], r["rejoin_s"]) >= 0


@pytest.mark.timeout(300)
def test_failover_onto_copies_then_rejoin(ray_cluster, tiny8, tmp_path, capsys):
    argv = ["bench", "failover", "--model", str(tiny8), "--workers", "3", "--redundant-experts", "8", "--streams",
            "4", "--input-len", "6", "--output-len", "120", "--kill", "worker 1", "--kill-after-tokens", "4",
            "--threads", "1", "--reserved-cpus", "0", "--no-progress", "--out", str(tmp_path / "f.json")]
    assert main(argv) == 0
    assert "rejoin began s" in capsys.readouterr().out
    report = json.loads((tmp_path / "f.json").read_text())
    assert report["redundant_experts"] == 8
    (r,) = report["rounds"]
    assert r["left_out"] == ["expert worker 1"] and r["replaced"] == [], r
    assert (r["exact"], r["failed"], r["replayed"]) == (4, 0, 4), r
    assert r["replace_s"] < 0.1, "nothing loads before serving resumes"
    assert r["serving_s"] < r["rejoin_after_s"] and r["rejoin_pause_s"] > 0, r
