"""The benchmark's pure pieces on hand-made inputs with known answers: prompts, client traces and latency
statistics, arrivals, left padding, metrics parsing, timing fields, ratios, agreement, pooled serve
points, tables."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cluster.bench.load import ClientTrace, LatencyStats, phase_delta, poisson_arrivals, summarize
from cluster.bench.offline import agreement
from cluster.bench.report import Ratios, compute_ratios, render, timing_fields
from cluster.bench.runners import left_padded
from cluster.bench.serve import PointSamples, SweepPoint
from cluster.bench.workload import RESERVED_IDS, Workload, make_prompts


def test_prompts_are_seeded_and_avoid_special_ids():
    w = Workload(num_prompts=4, input_len=7, output_len=3, seed=5)
    prompts = make_prompts(w, 50)
    assert prompts == make_prompts(w, 50) and prompts != make_prompts(Workload(num_prompts=4, input_len=7,
                                                                               output_len=3, seed=6), 50)
    assert all(len(p) == 7 and min(p) >= RESERVED_IDS and max(p) < 50 for p in prompts)
    assert w.forwarded_tokens == 4 * (7 + 3 - 1) and w.output_tokens == 12
    with pytest.raises(ValueError, match="output_len"):
        Workload(num_prompts=1, input_len=1, output_len=0)


def test_trace_latencies_split_multi_token_chunks():
    trace = ClientTrace(sent=0.0, chunk_times=(1.0, 2.0, 4.0), chunk_tokens=(1, 1, 2), done=4.5,
                        finish_reason="length")
    assert trace.ttft == 1.0 and trace.e2e == 4.5 and trace.tokens == 4
    assert trace.itl() == [1.0, 1.0, 1.0]
    assert trace.tpot == pytest.approx(3.0 / 3)
    joined_first = ClientTrace(sent=0.0, chunk_times=(1.0, 3.0), chunk_tokens=(3, 1), done=3.0, finish_reason="length")
    assert joined_first.itl() == [0.0, 0.0, 2.0], "tokens that came with the first one arrived with no gap"
    summary = summarize([trace, ClientTrace(0.0, (), (), 1.0, "", error="UNAVAILABLE: gone")])
    assert summary.ttft.count == 1 and summary.e2e.p50 == 4.5
    stats = LatencyStats.of([1.0, 2.0, 3.0, 4.0])
    assert stats.mean == 2.5 and stats.p50 == 2.5 and stats.p99 == pytest.approx(3.97)
    assert LatencyStats.of([]).p50 is None


def test_poisson_arrivals_are_seeded_and_increasing():
    offsets = poisson_arrivals(200, 10.0, seed=1)
    assert offsets == poisson_arrivals(200, 10.0, seed=1) and offsets[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(offsets))
    assert 10.0 < offsets[-1] < 30.0  # ~200 / 10 per second
    assert poisson_arrivals(3, math.inf, seed=0) == [0.0, 0.0, 0.0]


def test_left_padding_masks_the_pad():
    ids, mask = left_padded([(5, 6, 7), (8,)], pad_id=2, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_phase_delta_reads_the_histogram_sums():
    before = {"mixserve_step_phase_seconds_sum{phase=attention}": 1.0, "mixserve_generation_tokens_total": 3.0}
    after = {"mixserve_step_phase_seconds_sum{phase=attention}": 1.5,
             "mixserve_step_phase_seconds_sum{phase=experts}": 2.0, "mixserve_generation_tokens_total": 9.0}
    assert phase_delta(before, after) == {"attention": 0.5, "experts": 2.0}


def test_timing_fields_take_the_median_run():
    fields = timing_fields([3.0, 1.0, 2.0], requests=4, output_tokens=10)
    assert fields == dict(seconds=2.0, run_seconds=(3.0, 1.0, 2.0), best_seconds=1.0, requests=4, output_tokens=10,
                          output_tokens_per_s=5.0, requests_per_s=2.0)


class Measured:
    def __init__(self, label: str, engine: str, seconds: float, tokens: int) -> None:
        self.label, self.engine, self.seconds = label, engine, seconds
        self.output_tokens_per_s = tokens / seconds


def test_ratios_against_the_baseline_the_reference_and_the_floors():
    items = [Measured("hf", "transformers", 4.0, 8), Measured("a", "in-process", 1.0, 8),
             Measured("b", "ray", 2.0, 8)]
    ratios = compute_ratios(items, reference_label="a", floor_seconds=0.5, roofline_seconds=1.0)
    assert ratios == [Ratios(label="hf", tok_s_vs_transformers=1.0, time_vs_reference=4.0, floor_fraction=0.125,
                             roofline_fraction=0.25),
                      Ratios(label="a", tok_s_vs_transformers=4.0, time_vs_reference=1.0, floor_fraction=0.5,
                             roofline_fraction=1.0),
                      Ratios(label="b", tok_s_vs_transformers=2.0, time_vs_reference=2.0, floor_fraction=0.25,
                             roofline_fraction=0.5)]
    alone = compute_ratios(items[1:], reference_label=None)[0]
    assert alone.tok_s_vs_transformers is None and alone.time_vs_reference is None and alone.floor_fraction is None


def test_agreement_counts_requests_with_identical_tokens():
    reference = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]]
    assert agreement(reference, reference) == 1.0
    assert agreement([[1, 2, 3], [4, 5, 0], [7, 8, 9], [1, 1]], reference) == 0.5
    assert agreement(reference, None) is None


def test_a_serve_point_pools_rounds():
    point = SweepPoint(concurrency=2, request_rate=None, num_prompts=2)
    samples = PointSamples(label="x", engine="ray", workers=1, point=point)

    def trace(sent: float, tokens: int) -> ClientTrace:
        return ClientTrace(sent=sent, chunk_times=(sent + 1.0,), chunk_tokens=(tokens,), done=sent + 2.0,
                           finish_reason="length")

    samples.add([trace(0.0, 3), trace(0.0, 3)], 2.0, server_phases={"experts": 1.0},
                worker_phases=[{"experts": 0.5}], loads=(1.0, 2.0), cpu={"bench process": 1.0})
    samples.add([trace(5.0, 3), trace(5.0, 2)], 4.0, server_phases={"experts": 3.0},
                worker_phases=[{"experts": 1.5}], loads=(0.5, 3.0), cpu={"bench process": 2.0, "coordinator": 4.0})
    p = samples.to_point(output_len=3)
    assert (p.point, p.rounds, p.requests, p.output_tokens, p.seconds) == ("c=2", 2, 2, 5, 3.0)
    assert p.output_tokens_per_s == 11 / 6 and p.requests_per_s == 4 / 6
    assert p.server_phase_seconds == {"experts": 2.0} and p.worker_phase_seconds == ({"experts": 1.0},)
    assert p.cpu_seconds == {"bench process": 1.5, "coordinator": 2.0}
    assert p.load_1m == (0.5, 3.0) and p.latency.e2e.count == 4 and p.latency.ttft.p50 == 1.0
    assert not p.exact_output_len, "one request stopped at 2 of 3 tokens"
    assert SweepPoint(concurrency=None, request_rate=math.inf, num_prompts=1).key == "rate=inf"
    assert SweepPoint(concurrency=None, request_rate=0.5, num_prompts=1).key == "rate=0.5/s"


def test_tables_align_text_left_and_numbers_right():
    text = render(["engine", "s"], [["a", "1.00"], ["bb", "2.00"]])
    assert text.splitlines() == ["engine     s", "------  ----", "a       1.00", "bb      2.00"]
    assert render(["engine", "s"], [["a", "1"]], markdown=True).splitlines() == ["| engine | s |", "|---|---|",
                                                                                 "| a | 1 |"]
    assert render(["engine", "s"], []) == ""
