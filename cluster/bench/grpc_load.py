"""The load generator: streams GenerateStream requests over one grpc.aio channel, either closed-loop
(a fixed number of concurrent streams) or open-loop (Poisson arrivals at a request rate), and records a
trace per request from the chunks as they arrive."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable

import grpc

from cluster.bench.latency import RequestTrace
from protos import mixserve_pb2 as pb
from protos import mixserve_pb2_grpc as pb_grpc

OnTokens = Callable[[int], object]


def make_request(prompt: tuple[int, ...], output_len: int) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    return pb.GenerateRequest(prompt_token_ids=list(prompt), sampling=sampling)


async def stream_one(stub: pb_grpc.MixServeStub, prompt: tuple[int, ...], output_len: int, on_tokens: OnTokens,
                     timeout_s: float) -> RequestTrace:
    times: list[float] = []
    counts: list[int] = []
    finish, error = "", None
    sent = time.perf_counter()
    try:
        async for chunk in stub.GenerateStream(make_request(prompt, output_len), timeout=timeout_s):
            if chunk.token_ids:
                times.append(time.perf_counter())
                counts.append(len(chunk.token_ids))
                on_tokens(len(chunk.token_ids))
            finish = chunk.finish_reason or finish
    except grpc.aio.AioRpcError as exc:
        error = f"{exc.code().name}: {exc.details()}"
    return RequestTrace(sent=sent, chunk_times=tuple(times), chunk_tokens=tuple(counts), done=time.perf_counter(),
                        finish_reason=finish, error=error)


async def closed_loop(target: str, prompts: list[tuple[int, ...]], output_len: int, concurrency: int,
                      on_tokens: OnTokens, timeout_s: float) -> tuple[list[RequestTrace], float]:
    """`concurrency` streams at all times until every prompt is served; returns traces and wall seconds."""
    traces: list[RequestTrace | None] = [None] * len(prompts)
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
                    on_tokens: OnTokens, timeout_s: float) -> tuple[list[RequestTrace], float]:
    """Requests arrive as a Poisson process of `rate` per second, however many are in flight."""
    offsets = poisson_arrivals(len(prompts), rate, seed)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.MixServeStub(channel)
        start = time.perf_counter()

        async def client(i: int) -> RequestTrace:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            return await stream_one(stub, prompts[i], output_len, on_tokens, timeout_s)

        traces = await asyncio.gather(*(client(i) for i in range(len(prompts))))
        seconds = time.perf_counter() - start
    return list(traces), seconds
