"""Per-request traces measured at the client, and their latency summaries (mean, p50, p90, p99).

TTFT: send → first chunk carrying tokens. ITL: gaps between token-carrying chunks, a chunk of k tokens
counting as k gaps of 1/k of its gap (as the gateway's histogram does). TPOT: (last − first token) /
(tokens − 1) per request. E2E: send → last chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RequestTrace:
    sent: float
    chunk_times: tuple[float, ...]  # arrival of each chunk that carried tokens
    chunk_tokens: tuple[int, ...]
    done: float
    finish_reason: str
    error: str | None = None

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


def summarize(traces: list[RequestTrace]) -> LatencySummary:
    ok = [t for t in traces if t.error is None]
    return LatencySummary(
        ttft=LatencyStats.of([t.ttft for t in ok if t.ttft is not None]),
        itl=LatencyStats.of([gap for t in ok for gap in t.itl()]),
        tpot=LatencyStats.of([t.tpot for t in ok if t.tpot is not None]),
        e2e=LatencyStats.of([t.e2e for t in ok]),
    )
