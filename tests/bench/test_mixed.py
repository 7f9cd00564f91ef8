"""`mixserve bench mixed` end to end: a gateway on loopback over the Ray engine (0 and 1 expert workers), two
short streams decoding while a 40-token prompt arrives, against the two groups served apart; every request's
length, each group's latency percentiles, that the apart runs did not overlap and the together run did (from
the client's timestamps), and the ratio from the reported seconds. Then the pure helpers on hand-made spans."""

from __future__ import annotations

import json

import pytest

from cluster.bench.load import ClientTrace, staggered
from cluster.bench.mixed import decoding_at, overlap, span
from cluster.cli import main

SHORT_OUT, LONG_OUT = 96, 3  # the short streams decode long enough to still run when the long prompt arrives


def _check_group(group: dict, *, requests: int, output_len: int) -> None:
    assert group["exact_output_len"] and group["errors"] == 0, group
    assert group["requests"] == requests and group["output_tokens"] == requests * output_len
    assert group["output_tokens_per_s"] * group["seconds"] == pytest.approx(requests * output_len)
    for stat in ("ttft", "itl", "e2e"):
        s = group["latency"][stat]
        assert s["count"] > 0 and 0 <= s["p50"] <= s["p90"] <= s["p99"], (group["group"], stat, s)


@pytest.mark.timeout(180)
def test_mixed_against_apart_on_one_server(ray_cluster, tiny8, tmp_path, capsys):
    argv = ["bench", "mixed", "--model", str(tiny8), "--workers", "0,1", "--short-streams", "2",
            "--short-input-len", "4", "--short-output-len", str(SHORT_OUT), "--long-prompts", "1",
            "--long-input-len", "40", "--long-output-len", str(LONG_OUT), "--long-interval-ms", "10",
            "--max-batched-tokens", "16", "--threads", "1", "--reserved-cpus", "0", "--warmup-tokens", "2",
            "--no-progress", "--out", str(tmp_path / "m.json")]
    assert main(argv) == 0
    assert "together / apart" in capsys.readouterr().out
    report = json.loads((tmp_path / "m.json").read_text())
    assert report["mode"] == "mixed" and report["long"]["input_len"] == 40
    assert [r["workers"] for r in report["results"]] == [0, 1]
    for result in report["results"]:
        runs = {r["run"]: r for r in result["runs"]}
        assert list(runs) == ["short alone", "long alone", "together"]
        assert [g["group"] for g in runs["short alone"]["groups"]] == ["short"]
        assert [g["group"] for g in runs["long alone"]["groups"]] == ["long"]
        for run in runs.values():
            for g in run["groups"]:
                _check_group(g, requests=2 if g["group"] == "short" else 1,
                             output_len=SHORT_OUT if g["group"] == "short" else LONG_OUT)
            assert run["server_phase_seconds"]["attention"] > 0
        # apart: the long group was sent after the last short stream ended; together: while they decoded
        (short_start, short_end), = runs["short alone"]["groups"][0]["spans"]
        (long_start, long_end), = runs["long alone"]["groups"][0]["spans"]
        assert 0 <= short_start < short_end <= long_start < long_end and result["apart_overlap_seconds"] == 0
        (s_start, s_end), (l_start, l_end) = (g["spans"][0] for g in runs["together"]["groups"])
        assert 0 <= s_start < l_start < s_end and result["together_overlap_seconds"] > 0
        assert runs["together"]["short_decoding_at_long_arrival"] == [2]
        assert runs["together"]["seconds"] >= max(s_end, l_end) - 1e-6
        apart = runs["short alone"]["seconds"] + runs["long alone"]["seconds"]
        assert result["apart_seconds"] == pytest.approx(apart)
        assert result["together_seconds"] == runs["together"]["seconds"]
        assert result["together_vs_apart"] == pytest.approx(runs["together"]["seconds"] / apart)


def _trace(sent: float, first: float, done: float) -> ClientTrace:
    return ClientTrace(sent=sent, chunk_times=(first, done), chunk_tokens=(1, 1), done=done, finish_reason="length")


def test_spans_overlap_and_decoding_streams():
    short = [_trace(10.0, 10.5, 12.0), _trace(10.0, 10.6, 11.0), _trace(10.0, 11.5, 13.0)]
    assert span(short, origin=10.0) == (0.0, 3.0)
    assert overlap((0.0, 3.0), (3.0, 4.0)) == 0.0 and overlap((0.0, 3.0), (1.0, 4.0)) == 2.0
    assert overlap((0.0, 3.0), (4.0, 5.0)) == 0.0
    # at 10.55: only the first had a token; at 11.2: the second had ended, the third had no token yet
    assert [decoding_at(short, t) for t in (10.4, 10.55, 10.8, 11.2, 11.6, 13.0)] == [0, 1, 2, 1, 2, 0]
    assert staggered(3, 0.25, 0.1) == pytest.approx((0.1, 0.35, 0.6))
