"""Soak: N concurrent streams for D seconds against a live gateway with one expert worker.

Each stream runs short generations back to back (8-32 prompt tokens, 4-16 new tokens) so the server cycles
thousands of requests through admission, the KV cache and release. Recorded: errors, time to first token and
end-to-end latency percentiles, completed requests, and the resident memory of the gateway (this test process),
the coordinator and the expert worker every few seconds.

Acceptance:
- zero errors: every call ends OK with exactly its max_new_tokens (no RESOURCE_EXHAUSTED: the waiting queue is
  sized for N streams);
- flat memory: for each process, growth = (end - baseline) / baseline < 5%, where baseline is the first RSS sample
  taken at or after the warm-up (30 s, or a quarter of D when D is short) and end is the last sample taken while
  the load still runs;
- once idle, the KV cache is empty and nothing runs or waits.

Environment (read here only): MIXSERVE_SOAK_SECONDS (default 180), MIXSERVE_SOAK_STREAMS (default 200),
MIXSERVE_SOAK_REPORT (a path: the JSON report is written there).
"""

from __future__ import annotations

import concurrent.futures as futures
import datetime
import json
import math
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from cluster.rank_introspection import rank_infos
from cluster.scheduler import SchedulerConfig
from protos import mixserve_pb2 as pb
from protos import mixserve_pb2_grpc as pb_grpc
from tests.e2e.harness import RunningGateway
from tests.fuzz.live import assert_still_serving, metric, metrics_text, rss_bytes, wait_idle

DEFAULT_SECONDS, DEFAULT_STREAMS = 180.0, 200
SCHEDULER = SchedulerConfig(max_num_seqs=64, max_waiting=512)
KV_CACHE_BYTES = 32 * 2**20
CHANNELS = 4  # the streams share a few HTTP/2 connections
SAMPLE_EVERY_S = 5.0
WARMUP_S = 30.0
MAX_GROWTH = 0.05
REQUEST_TIMEOUT_S = 60.0
MIB = 2**20
_TIMEOUT_S = 600 + 2 * float(os.environ.get("MIXSERVE_SOAK_SECONDS", DEFAULT_SECONDS))


@dataclass
class StreamLog:
    """One client stream's record; each thread owns one, merged at the end."""

    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: Counter = field(default_factory=Counter)
    error_examples: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.error_examples) < 3:
            self.error_examples.append(f"{kind}: {detail[:200]}")


def run_stream(stub, seed: int, vocab: int, stop_at: float) -> StreamLog:
    rng, log = random.Random(seed), StreamLog()
    while time.monotonic() < stop_at:
        max_new = rng.randint(4, 16)
        sampling = pb.SamplingParams(max_new_tokens=max_new, ignore_eos=True, temperature=0.0)
        if rng.random() < 0.5:
            sampling = pb.SamplingParams(max_new_tokens=max_new, ignore_eos=True, temperature=0.8, top_k=40,
                                         seed=rng.randrange(2**32))
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(8, 32))]
        started, first, got, reason = time.monotonic(), None, 0, ""
        try:
            for chunk in stub.GenerateStream(pb.GenerateRequest(prompt_token_ids=prompt, sampling=sampling),
                                             timeout=REQUEST_TIMEOUT_S):
                if chunk.token_ids and first is None:
                    first = time.monotonic()
                got += len(chunk.token_ids)
                reason = chunk.finish_reason or reason
        except grpc.RpcError as exc:
            log.error(exc.code().name, exc.details() or "")
            continue
        if (got, reason) != (max_new, "length") or first is None:
            log.error("WRONG_ANSWER", f"{got} tokens, finish_reason {reason!r}, wanted {max_new} and 'length'")
            continue
        log.ttft.append(first - started)
        log.e2e.append(time.monotonic() - started)
        log.tokens += got
    return log


def sample_memory(server, pids: dict[str, int], started: float, stop_at: float, out: list[dict]) -> None:
    """Every SAMPLE_EVERY_S until stop_at: RSS of each process and the engine's gauges."""
    while True:
        text = metrics_text(server)
        out.append({
            "t": round(time.monotonic() - started, 1),
            "rss_mb": {name: round(rss_bytes(pid) / MIB, 2) for name, pid in pids.items()},
            "running": metric(text, "mixserve_num_requests_running"),
            "waiting": metric(text, "mixserve_num_requests_waiting"),
            "kv_usage": metric(text, "mixserve_kv_cache_usage_ratio"),
        })
        if time.monotonic() >= stop_at:
            return
        time.sleep(min(SAMPLE_EVERY_S, max(stop_at - time.monotonic(), 0.0)))


def memory_growth(samples: list[dict], warmup_s: float) -> dict[str, dict]:
    """Per process: baseline (first sample at or after warm-up), end (last sample), growth = (end - baseline) /
    baseline, the peak after warm-up, and the least-squares slope after warm-up in MiB per minute (reported, not
    judged: it tells a slow leak from allocator noise on longer runs)."""
    after = [s for s in samples if s["t"] >= warmup_s]
    assert len(after) >= 2, f"too few samples after the {warmup_s}s warm-up: {[s['t'] for s in samples]}"
    out = {}
    for name in after[0]["rss_mb"]:
        baseline, end = after[0]["rss_mb"][name], after[-1]["rss_mb"][name]
        out[name] = {"baseline_mb": baseline, "end_mb": end, "growth": round((end - baseline) / baseline, 4),
                     "peak_mb": max(s["rss_mb"][name] for s in after), "baseline_t": after[0]["t"],
                     "end_t": after[-1]["t"], "slope_mb_per_min": _slope(after, name)}
    return out


def _slope(samples: list[dict], name: str) -> float:
    ts = [s["t"] / 60 for s in samples]
    ys = [s["rss_mb"][name] for s in samples]
    t_mean, y_mean = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - t_mean) ** 2 for t in ts)
    return round(sum((t - t_mean) * (y - y_mean) for t, y in zip(ts, ys, strict=True)) / var, 3) if var else 0.0


def percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank p50 / p90 / p99 and max, in seconds."""
    if not values:
        return {}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"p50": round(rank(0.50), 4), "p90": round(rank(0.90), 4), "p99": round(rank(0.99), 4),
            "max": round(ordered[-1], 4)}


@pytest.fixture(scope="module")
def soak_server(ray_cluster, served_model):
    with RunningGateway(served_model, workers=1, scheduler=SCHEDULER, kv_cache_bytes=KV_CACHE_BYTES) as running:
        yield running


@pytest.mark.slow
@pytest.mark.timeout(_TIMEOUT_S)
def test_soak_many_streams_no_errors_flat_memory_empty_cache(soak_server):
    seconds = float(os.environ.get("MIXSERVE_SOAK_SECONDS", DEFAULT_SECONDS))
    streams = int(os.environ.get("MIXSERVE_SOAK_STREAMS", DEFAULT_STREAMS))
    warmup_s = min(WARMUP_S, seconds / 4)
    server, vocab = soak_server, soak_server.engine.cfg.vocab_size
    ranks = {name: info.pid for name, info in rank_infos(server.engine).items()}
    pids = {"gateway (test process)": os.getpid(), **ranks}
    assert_still_serving(server)
    channels = [grpc.insecure_channel(server.target) for _ in range(CHANNELS)]
    stubs = [pb_grpc.MixServeStub(c) for c in channels]
    samples: list[dict] = []
    load_before = os.getloadavg()
    started = time.monotonic()
    stop_at = started + seconds
    sampler = threading.Thread(target=sample_memory, args=(server, pids, started, stop_at, samples), daemon=True)
    sampler.start()
    try:
        with futures.ThreadPoolExecutor(streams, thread_name_prefix="soak") as pool:
            logs = list(pool.map(lambda i: run_stream(stubs[i % CHANNELS], i, vocab, stop_at), range(streams)))
    finally:
        for channel in channels:
            channel.close()
    load_s = time.monotonic() - started
    sampler.join(SAMPLE_EVERY_S + 30)
    idle = wait_idle(server)

    errors = sum((log.errors for log in logs), Counter())
    completed = sum(len(log.e2e) for log in logs)
    growth = memory_growth(samples, warmup_s)
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": {"streams": streams, "seconds": seconds, "warmup_s": warmup_s, "sample_every_s": SAMPLE_EVERY_S,
                   "expert_workers": 1, "max_num_seqs": SCHEDULER.max_num_seqs, "max_waiting": SCHEDULER.max_waiting,
                   "kv_cache_bytes": KV_CACHE_BYTES, "prompt_tokens": [8, 32], "new_tokens": [4, 16],
                   "channels": CHANNELS, "cpus": os.cpu_count()},
        "loadavg": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "requests": {"completed": completed, "errors": sum(errors.values()), "errors_by_code": dict(errors),
                     "error_examples": [e for log in logs for e in log.error_examples][:10],
                     "tokens": sum(log.tokens for log in logs), "load_seconds": round(load_s, 1),
                     "requests_per_s": round(completed / load_s, 2),
                     "tokens_per_s": round(sum(log.tokens for log in logs) / load_s, 1)},
        "latency_s": {"ttft": percentiles([t for log in logs for t in log.ttft]),
                      "e2e": percentiles([t for log in logs for t in log.e2e])},
        "memory": {"pids": pids, "growth": growth, "max_growth": MAX_GROWTH, "samples": samples},
        "idle_after": {name: metric(idle, f"mixserve_{name}") for name in
                       ("kv_cache_usage_ratio", "num_requests_running", "num_requests_waiting")},
    }
    if path := os.environ.get("MIXSERVE_SOAK_REPORT"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("requests", "latency_s")} | {"memory": growth}))

    assert completed > 0
    assert not errors, f"{sum(errors.values())} errors: {dict(errors)}; e.g. {report['requests']['error_examples']}"
    grown = {name: g["growth"] for name, g in growth.items() if g["growth"] >= MAX_GROWTH}
    assert not grown, f"memory grew by {MAX_GROWTH:.0%} or more after warm-up: {grown} ({growth})"
    assert report["idle_after"] == {"kv_cache_usage_ratio": 0, "num_requests_running": 0, "num_requests_waiting": 0}
    assert_still_serving(server)
