"""`bench serve` with a shared prefix and prefix caching off and on, the pure parts on hand-made inputs: prompts
that share one prefix, seeds that never repeat a prompt to one engine (so a cache starts cold), the labels,
pairing off with on, the TTFT ratio, the token-by-token check, and the command-line switches."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cluster.bench.cli import _one_switch, _switches, build_parser
from cluster.bench.load import ClientTrace, prefix_cache_delta
from cluster.bench.prefix_cache import CachedRun, compare, first_difference, mismatches, table_rows, ttft_ratio
from cluster.bench.serve import PointSamples, ServeOptions, SweepPoint
from cluster.bench.workload import RESERVED_IDS, EngineSetup, Workload, engine_settings, make_prompts
from workers.config import ModelConfig

TINY = Path(__file__).resolve().parents[2] / "models" / "mixserve-tiny"
BLOCK = 16


def test_prompts_share_one_prefix_then_differ():
    w = Workload(num_prompts=5, input_len=6, output_len=2, seed=3, shared_prefix_len=40)
    prompts = make_prompts(w, 100)
    assert w.prompt_len == 46 and w.forwarded_tokens == 5 * (46 + 2 - 1)
    assert all(len(p) == 46 and min(p) >= RESERVED_IDS and max(p) < 100 for p in prompts)
    assert len({p[:40] for p in prompts}) == 1, "one prefix for all"
    assert len({p[40:] for p in prompts}) == 5, "each prompt's own tokens differ"
    other = make_prompts(Workload(num_prompts=5, input_len=6, output_len=2, seed=4, shared_prefix_len=40), 100)
    assert other[0][:40] != prompts[0][:40], "another seed, another prefix"
    with pytest.raises(ValueError, match="shared_prefix_len"):
        Workload(num_prompts=1, input_len=1, output_len=1, shared_prefix_len=-1)


def test_prompts_without_a_prefix_are_unchanged():
    w = Workload(num_prompts=3, input_len=7, output_len=1, seed=9)
    expected = torch.randint(RESERVED_IDS, 50, (3, 7), generator=torch.Generator().manual_seed(9)).tolist()
    assert make_prompts(w, 50) == [tuple(row) for row in expected]
    assert w.prompt_len == 7


def _opts(**kw) -> ServeOptions:
    setup = EngineSetup(model_dir=TINY, device=torch.device("cpu"), dtype=torch.float32, threads_per_rank=1,
                        max_batched_tokens=1024, max_num_seqs=32)
    return ServeOptions(**dict(dict(setup=setup, input_len=24, output_len=4, concurrency=(8, 32),
                                    shared_prefix_len=1000, prefix_caching=(True, False), transformers=False), **kw))


def test_no_prompt_or_prefix_is_sent_twice_to_one_engine():
    opts = _opts()
    cfg = ModelConfig.from_model_dir(TINY)
    sweep = opts.sweep()
    seeds = [opts.prompt_seed(r, p) for r in range(3) for p in [*sweep, None]]
    assert len(set(seeds)) == len(seeds) == 9, seeds
    first_blocks = []
    for r in range(2):
        warm = opts.prompts(cfg, sweep[-1], r, warmup=True)
        measured = [opts.prompts(cfg, p, r) for p in sweep]
        assert all(len(p) == 1024 for p in warm + measured[0] + measured[1])
        first_blocks += [warm[0][:BLOCK], *(m[0][:BLOCK] for m in measured)]
        assert opts.prompts(cfg, sweep[0], r) == measured[0], "every engine of a round sees the same prompts"
    assert len(set(first_blocks)) == len(first_blocks), "no first KV block (hence no prefix) is shared"


def test_labels_name_the_setting_only_when_both_run():
    both, on = _opts(), _opts(prefix_caching=(True,))
    assert both.engine_label(2, True) == "mixserve Ray, 2 expert workers, prefix caching on"
    assert both.engine_label(0, False) == "mixserve Ray, 0 workers (experts in coordinator), prefix caching off"
    assert on.engine_label(2, True) == "mixserve Ray, 2 expert workers"
    with pytest.raises(ValueError, match="each once"):
        _opts(prefix_caching=(True, True))
    with pytest.raises(ValueError, match="one or both"):
        _opts(prefix_caching=())
    with pytest.raises(ValueError, match="--target"):
        _opts(target="127.0.0.1:1")


def _run(point: str, workers: int, caching: bool, ttft: float | None, tokens) -> CachedRun:
    return CachedRun(label=f"w{workers} {'on' if caching else 'off'}", workers=workers, point=point,
                     prefix_caching=caching, ttft_p50=ttft, token_ids=tuple(map(tuple, tokens)))


def test_compare_pairs_off_with_on_and_checks_every_token():
    same = [[5, 6], [7, 8], [9, 9]]
    runs = [_run("c=32", 0, True, 0.1, same), _run("c=32", 0, False, 0.8, same),
            _run("c=32", 2, False, 1.2, same), _run("c=32", 2, True, 0.3, [[5, 6], [7, 0], [9, 9]]),
            _run("c=8", 2, True, 0.2, same)]  # no off run at c=8: not compared
    zero, two = compare(runs)
    assert (zero.point, zero.workers, zero.off_label, zero.on_label) == ("c=32", 0, "w0 off", "w0 on")
    assert zero.ttft_p50_ratio == pytest.approx(8.0) and zero.tokens_identical and zero.first_difference is None
    assert zero.requests == 3
    assert two.ttft_p50_ratio == pytest.approx(4.0)
    assert not two.tokens_identical and two.first_difference == 1
    assert mismatches([zero, two]) == ["c=32, workers=2: request 1 differs between 'w2 off' and 'w2 on'"]
    assert mismatches([zero]) == []
    rows = table_rows((zero, two))
    assert rows[0] == ["c=32", "0", "800", "100", "8.00×", "3", "yes"]
    assert rows[1][-1] == "NO (request 1)"
    with pytest.raises(ValueError, match="two runs"):
        compare([_run("c=8", 0, True, 0.1, same), _run("c=8", 0, True, 0.2, same)])


def test_engines_with_other_coordinator_counts_are_compared_apart():
    same = [[5, 6]]
    runs = [replace(_run("c=8", 1, caching, 0.5, same), coordinators=coordinators, label=f"c{coordinators} {caching}")
            for coordinators in (1, 2) for caching in (False, True)]
    one, two = compare(runs)
    assert (one.off_label, one.on_label, two.off_label, two.on_label) == ("c1 False", "c1 True", "c2 False", "c2 True")


def test_a_missing_request_or_ttft_is_not_a_match():
    assert first_difference(((1,), (2,)), ((1,),)) == 1
    assert first_difference(((1,), (2,)), ((1,), (2,))) is None
    assert first_difference((), ()) is None
    assert ttft_ratio(1.0, None) is None and ttft_ratio(None, 1.0) is None and ttft_ratio(1.0, 0.0) is None
    assert ttft_ratio(3.0, 0.5) == 6.0


def test_point_samples_carry_tokens_and_the_cache_counters():
    point = SweepPoint(concurrency=2, request_rate=None, num_prompts=2)
    samples = PointSamples(label="x", engine="ray", workers=2, point=point, prefix_caching=True)

    def trace(ttft: float, ids: tuple[int, ...], error: str | None = None) -> ClientTrace:
        return ClientTrace(sent=0.0, chunk_times=(ttft,), chunk_tokens=(len(ids),), done=ttft + 1.0,
                           finish_reason="length", error=error, token_ids=ids)

    for reused in (992.0, 1984.0):
        samples.add([trace(0.1, (4, 5)), trace(0.3, (6, 7))], 1.0, server_phases={}, worker_phases=[],
                    loads=(0.0, 0.0), cpu={}, prefix_tokens={"looked up": 2048.0, "reused": reused})
    samples.add([trace(9.0, (1,), error="UNAVAILABLE: gone")], 1.0, server_phases={}, worker_phases=[],
                loads=(0.0, 0.0), cpu={})
    run = samples.cached_run()
    assert run.token_ids == ((4, 5), (6, 7), (4, 5), (6, 7), (1,)) and run.prefix_caching
    assert run.ttft_p50 == pytest.approx(0.2), "the failed request's TTFT is left out"
    p = samples.to_point(output_len=2)
    assert p.prefix_caching and p.prefix_cache_tokens == {"looked up": 4096 / 3, "reused": 2976 / 3}
    with pytest.raises(AssertionError, match="not a mixserve engine"):
        PointSamples(label="hf", engine="transformers", workers=None, point=point).cached_run()


def test_prefix_cache_delta_reads_the_counters():
    before = {"mixserve_prefix_cache_query_tokens_total": 10.0, "mixserve_prefix_cache_hit_tokens_total": 4.0}
    after = {"mixserve_prefix_cache_query_tokens_total": 1034.0, "mixserve_prefix_cache_hit_tokens_total": 996.0}
    assert prefix_cache_delta(before, after) == {"looked up": 1024.0, "reused": 992.0}
    assert prefix_cache_delta({}, {"other": 1.0}) == {}


def test_the_kv_cache_is_sized_for_the_whole_prompt():
    cfg = ModelConfig.from_model_dir(TINY)
    setup = _opts().setup

    def kv_bytes(**kw) -> int:
        return engine_settings(cfg, setup, Workload(num_prompts=32, output_len=16, **kw)).kv_cache_bytes

    assert kv_bytes(input_len=24, shared_prefix_len=1000) == kv_bytes(input_len=1024) > kv_bytes(input_len=24)


def test_switches_on_the_command_line():
    assert _switches("on,off") == (True, False) and _switches("off") == (False,)
    with pytest.raises(argparse.ArgumentTypeError, match="on,off"):
        _switches("maybe")
    args = build_parser().parse_args(["serve", "--prefix-caching", "on,off", "--shared-prefix-len", "1000"])
    assert args.prefix_caching == (True, False) and args.shared_prefix_len == 1000
    offline = build_parser().parse_args(["offline", "--prefix-caching", "on,off"])
    with pytest.raises(ValueError, match="one prefix-caching setting"):
        _one_switch(offline)
    _one_switch(build_parser().parse_args(["offline", "--no-prefix-caching"]))
