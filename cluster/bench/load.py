"""The client side of `bench serve` and `bench mixed`: a load generator streaming GenerateStream requests over
one grpc.aio channel, closed-loop (a fixed number of concurrent streams), open-loop (Poisson arrivals at a
request rate) or in groups with scheduled arrivals (one group's clock may start once another group's
streams are all decoding); a trace per request from the chunks as they arrive and its latency summaries;
and the server's own view, scraped from its Prometheus /metrics.

TTFT: send → first chunk carrying tokens. ITL: gaps between token-carrying chunks, a chunk of k tokens
counting as k gaps of 1/k of its gap (as the gateway's histogram does). TPOT: (last − first token) /
(tokens − 1) per request. E2E: send → last chunk.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from cluster.bench.machine import delta
from protos import mixserve_pb2 as pb
from protos import mixserve_pb2_grpc as pb_grpc

OnTokens = Callable[[int], object]
PHASE_SUM = "mixserve_step_phase_seconds_sum"
GENERATED = "mixserve_generation_tokens_total"
PREFIX_CACHE_COUNTERS = {"looked up": "mixserve_prefix_cache_query_tokens_total",
                         "reused": "mixserve_prefix_cache_hit_tokens_total"}


@dataclass(frozen=True)
class ClientTrace:
    """One request as the client saw it (not the gateway's record of a request, cluster.gateway.service)."""

    sent: float
    chunk_times: tuple[float, ...]  # arrival of each chunk that carried tokens
    chunk_tokens: tuple[int, ...]
    done: float
    finish_reason: str
    error: str | None = None
    token_ids: tuple[int, ...] = ()  # the tokens as streamed (empty where a trace was not streamed)

    @property
    def tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.done - self.sent

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.tokens - 1)

    def itl(self) -> list[float]:
        """One gap per token after the first: a chunk's gap since the previous chunk, shared by its tokens;
        tokens that came in the first chunk (the gateway joins the updates a slow stream has waiting) count
        as arriving with no gap, as the gateway's own ITL histogram counts them."""
        gaps = [0.0] * (self.chunk_tokens[0] - 1) if self.chunk_tokens else []
        for prev, now, count in zip(self.chunk_times, self.chunk_times[1:], self.chunk_tokens[1:], strict=False):
            gaps += [(now - prev) / count] * count
        return gaps


@dataclass(frozen=True)
class LatencyStats:
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of(cls, values: list[float]) -> LatencyStats:
        if not values:
            return cls(0, None, None, None, None)
        arr = np.asarray(values, dtype=np.float64)
        p50, p90, p99 = np.percentile(arr, [50, 90, 99]).tolist()
        return cls(len(values), float(arr.mean()), p50, p90, p99)


@dataclass(frozen=True)
class LatencySummary:
    ttft: LatencyStats
    itl: LatencyStats
    tpot: LatencyStats
    e2e: LatencyStats


def summarize(traces: list[ClientTrace]) -> LatencySummary:
    ok = [t for t in traces if t.error is None]
    return LatencySummary(
        ttft=LatencyStats.of([t.ttft for t in ok if t.ttft is not None]),
        itl=LatencyStats.of([gap for t in ok for gap in t.itl()]),
        tpot=LatencyStats.of([t.tpot for t in ok if t.tpot is not None]),
        e2e=LatencyStats.of([t.e2e for t in ok]),
    )


async def stream_one(stub: pb_grpc.MixServeStub, prompt: tuple[int, ...], output_len: int, on_tokens: OnTokens,
                     timeout_s: float) -> ClientTrace:
    sampling = pb.SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    request = pb.GenerateRequest(prompt_token_ids=list(prompt), sampling=sampling)
    times: list[float] = []
    counts: list[int] = []
    ids: list[int] = []
    finish, error = "", None
    sent = time.perf_counter()
    try:
        async for chunk in stub.GenerateStream(request, timeout=timeout_s):
            if chunk.token_ids:
                times.append(time.perf_counter())
                counts.append(len(chunk.token_ids))
                ids.extend(chunk.token_ids)
                on_tokens(len(chunk.token_ids))
            finish = chunk.finish_reason or finish
    except grpc.aio.AioRpcError as exc:
        error = f"{exc.code().name}: {exc.details()}"
    return ClientTrace(sent=sent, chunk_times=tuple(times), chunk_tokens=tuple(counts), done=time.perf_counter(),
                       finish_reason=finish, error=error, token_ids=tuple(ids))


async def closed_loop(target: str, prompts: list[tuple[int, ...]], output_len: int, concurrency: int,
                      on_tokens: OnTokens, timeout_s: float) -> tuple[list[ClientTrace], float]:
    """`concurrency` streams at all times until every prompt is served; returns traces and wall seconds."""
    traces: list[ClientTrace | None] = [None] * len(prompts)
    next_index = iter(range(len(prompts)))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.MixServeStub(channel)

        async def client() -> None:
            for i in next_index:
                traces[i] = await stream_one(stub, prompts[i], output_len, on_tokens, timeout_s)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(min(concurrency, len(prompts)))))
        seconds = time.perf_counter() - start
    return [t for t in traces if t is not None], seconds


def poisson_arrivals(count: int, rate: float, seed: int) -> list[float]:
    """Send offsets in seconds; an infinite rate sends everything at once."""
    if math.isinf(rate):
        return [0.0] * count
    rng = random.Random(seed)
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


async def open_loop(target: str, prompts: list[tuple[int, ...]], output_len: int, rate: float, seed: int,
                    on_tokens: OnTokens, timeout_s: float) -> tuple[list[ClientTrace], float]:
    """Requests arrive as a Poisson process of `rate` per second, however many are in flight."""
    offsets = poisson_arrivals(len(prompts), rate, seed)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.MixServeStub(channel)
        start = time.perf_counter()

        async def client(i: int) -> ClientTrace:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            return await stream_one(stub, prompts[i], output_len, on_tokens, timeout_s)

        traces = await asyncio.gather(*(client(i) for i in range(len(prompts))))
        seconds = time.perf_counter() - start
    return list(traces), seconds


@dataclass(frozen=True, kw_only=True)
class GroupLoad:
    """One group of requests: each of `prompts` produces exactly output_len tokens and is sent `offsets[i]`
    seconds after the group's clock starts: at the load's start, or, when `after` names another group, once
    every stream of that group has received its first token (or ended)."""

    name: str
    prompts: tuple[tuple[int, ...], ...]
    output_len: int
    offsets: tuple[float, ...]
    after: str | None = None

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.prompts):
            raise ValueError(f"group {self.name}: {len(self.offsets)} offsets for {len(self.prompts)} prompts")
        if self.after == self.name:
            raise ValueError(f"group {self.name} cannot wait for its own first tokens")


def staggered(count: int, interval_s: float, delay_s: float = 0.0) -> tuple[float, ...]:
    """Send offsets: one every interval_s seconds after delay_s."""
    return tuple(delay_s + i * interval_s for i in range(count))


async def grouped_load(target: str, groups: tuple[GroupLoad, ...], on_tokens: OnTokens,
                       timeout_s: float) -> tuple[dict[str, list[ClientTrace]], float, float]:
    """Every group's requests at their offsets, concurrently; returns the traces by group (in prompt order),
    the start (time.perf_counter) and the wall seconds from the start to the last request's end."""
    names = {g.name for g in groups}
    if len(names) != len(groups) or any(g.after is not None and g.after not in names for g in groups):
        raise ValueError(f"group names must be unique and `after` must name one of them: {groups}")
    waiting = {g.name: len(g.prompts) for g in groups}  # streams of the group without a first token yet
    decoding = {g.name: asyncio.Event() for g in groups}
    decoding_since: dict[str, float] = {}

    def first_token(name: str) -> None:
        waiting[name] -= 1
        if waiting[name] == 0:
            decoding_since[name] = time.perf_counter()
            decoding[name].set()

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.MixServeStub(channel)
        start = time.perf_counter()

        async def client(group: GroupLoad, i: int) -> ClientTrace:
            clock = start
            if group.after is not None:
                await decoding[group.after].wait()
                clock = decoding_since[group.after]
            await asyncio.sleep(max(0.0, clock + group.offsets[i] - time.perf_counter()))
            seen = False

            def count(tokens: int) -> None:
                nonlocal seen
                if not seen:
                    seen = True
                    first_token(group.name)
                on_tokens(tokens)

            try:
                return await stream_one(stub, group.prompts[i], group.output_len, count, timeout_s)
            finally:
                if not seen:  # failed before its first token: the groups waiting on this one still start
                    first_token(group.name)

        traces = await asyncio.gather(*(client(g, i) for g in groups for i in range(len(g.prompts))))
        seconds = time.perf_counter() - start
    by_group, rest = {}, iter(traces)
    for g in groups:
        by_group[g.name] = [next(rest) for _ in g.prompts]
    return by_group, start, seconds


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """Flat samples of a Prometheus text page: `name` or `name{label=value,...}` → value."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def phase_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Step seconds by phase between two scrapes (mixserve_step_phase_seconds_sum, after − before)."""
    prefix = PHASE_SUM + "{phase="

    def sums(samples: dict[str, float]) -> dict[str, float]:
        return {key[len(prefix):-1]: value for key, value in samples.items() if key.startswith(prefix)}

    return delta(sums(before), sums(after))


def prefix_cache_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Prompt tokens looked up in the prefix cache and reused from it between two scrapes ({} without the
    counters: an engine with caching off, or a server that does not export them)."""
    names = PREFIX_CACHE_COUNTERS.items()
    return {k: after[n] - before.get(n, 0.0) for k, n in names if n in after}


def scrape_settled(url: str, before: dict[str, float], expected_tokens: int,
                   timeout_s: float = 5.0) -> dict[str, float]:
    """Scrapes until the finished-token counter has grown by expected_tokens (metrics trail the last chunk)."""
    deadline = time.monotonic() + timeout_s
    while True:
        after = scrape(url)
        grown = after.get(GENERATED, 0.0) - before.get(GENERATED, 0.0)
        if grown >= expected_tokens or time.monotonic() > deadline:
            return after
        time.sleep(0.05)
