"""The benchmark's pure pieces: prompts, latency statistics, arrivals, left padding, metrics parsing, tables."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from cluster.bench.grpc_load import poisson_arrivals
from cluster.bench.hf_baseline import left_padded
from cluster.bench.latency import LatencyStats, RequestTrace, summarize
from cluster.bench.prom import phase_delta
from cluster.bench.results import compute_ratios, run_stats
from cluster.bench.table import render
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
    trace = RequestTrace(sent=0.0, chunk_times=(1.0, 2.0, 4.0), chunk_tokens=(1, 1, 2), done=4.5,
                         finish_reason="length")
    assert trace.ttft == 1.0 and trace.e2e == 4.5 and trace.tokens == 4
    assert trace.itl() == [1.0, 1.0, 1.0]
    assert trace.tpot == pytest.approx(3.0 / 3)
    joined_first = RequestTrace(sent=0.0, chunk_times=(1.0, 3.0), chunk_tokens=(3, 1), done=3.0, finish_reason="length")
    assert joined_first.itl() == [0.0, 0.0, 2.0], "tokens that came with the first one arrived with no gap"
    summary = summarize([trace, RequestTrace(0.0, (), (), 1.0, "", error="UNAVAILABLE: gone")])
    assert summary.ttft.count == 1 and summary.e2e.p50 == 4.5
    stats = LatencyStats.of([1.0, 2.0, 3.0, 4.0])
    assert stats.mean == 2.5 and stats.p50 == 2.5 and stats.p99 <= 4.0
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
    before = {'mixserve_step_phase_seconds_sum{phase=attention}': 1.0, "mixserve_generation_tokens_total": 3.0}
    after = {'mixserve_step_phase_seconds_sum{phase=attention}': 1.5,
             'mixserve_step_phase_seconds_sum{phase=experts}': 2.0}
    assert phase_delta(before, after) == {"attention": 0.5, "experts": 2.0}


def test_ratios_and_tables():
    class M:
        def __init__(self, label, engine, seconds, tokens):
            for k, v in run_stats(label, engine, None, [seconds], 2, tokens).items():
                setattr(self, k, v)

    items = [M("hf", "transformers", 4.0, 8), M("a", "in-process", 1.0, 8), M("b", "ray", 2.0, 8)]
    ratios = {r.label: r for r in compute_ratios(items, reference_label="a", floor_seconds=0.5)}
    assert ratios["a"].tok_s_vs_transformers == 4.0 and ratios["b"].time_vs_reference == 2.0
    assert ratios["b"].floor_fraction == 0.25
    assert compute_ratios(items[1:], reference_label=None)[0].tok_s_vs_transformers is None
    text = render(["engine", "s"], [["a", "1.00"], ["bb", "2.00"]])
    assert text.splitlines()[2] == "a       1.00"
    assert render(["engine", "s"], [["a", "1"]], markdown=True).splitlines()[1] == "|---|---|"
