"""Prefix caching on against off in one `bench serve` run: which engines pair up (same worker count, same
sweep point, caching on and off), how much lower the TTFT p50 is with the cache, and whether the greedy
tokens of every request are the same both ways.

Knows nothing of how the engines were driven: it reads what each measured (labels, TTFT p50, tokens).
"""

from __future__ import annotations

from dataclasses import dataclass


def switch_label(enabled: bool) -> str:
    return "on" if enabled else "off"


def caching_suffix(enabled: bool) -> str:
    """What an engine's label gets when a run measures prefix caching both ways."""
    return f", prefix caching {switch_label(enabled)}"


@dataclass(frozen=True, kw_only=True)
class CachedRun:
    """One mixserve engine at one sweep point, as the comparison needs it."""

    label: str
    workers: int | None
    point: str
    prefix_caching: bool
    coordinators: int = 1
    ttft_p50: float | None  # seconds; None without a finished request
    token_ids: tuple[tuple[int, ...], ...]  # per request, every round's requests in prompt order


@dataclass(frozen=True, kw_only=True)
class PrefixCacheComparison:
    """The same engine at the same point with prefix caching off and on."""

    point: str
    workers: int | None
    off_label: str
    on_label: str
    ttft_p50_off: float | None
    ttft_p50_on: float | None
    ttft_p50_ratio: float | None  # off ÷ on: how many times lower the TTFT p50 is with the cache
    requests: int  # requests compared token by token
    tokens_identical: bool  # every request's greedy tokens equal with caching on and off
    first_difference: int | None  # index of the first request whose tokens differ (None: identical)


def ttft_ratio(off: float | None, on: float | None) -> float | None:
    if off is None or on is None or on <= 0:
        return None
    return off / on


def first_difference(off: tuple[tuple[int, ...], ...], on: tuple[tuple[int, ...], ...]) -> int | None:
    """The first request whose tokens differ; a request one side lacks counts as differing."""
    for i in range(max(len(off), len(on))):
        if i >= len(off) or i >= len(on) or off[i] != on[i]:
            return i
    return None


def compare(runs: list[CachedRun]) -> list[PrefixCacheComparison]:
    """One comparison per (point, workers, coordinators) measured both with and without the cache, in the order
    measured."""
    by_key: dict[tuple[str, int | None, int], dict[bool, CachedRun]] = {}
    for run in runs:
        pair = by_key.setdefault((run.point, run.workers, run.coordinators), {})
        if run.prefix_caching in pair:
            twin = pair[run.prefix_caching].label
            raise ValueError(f"two runs of {run.point}, workers={run.workers}, prefix caching "
                             f"{switch_label(run.prefix_caching)}: {twin!r} and {run.label!r}")
        pair[run.prefix_caching] = run
    out = []
    for (point, workers, _), pair in by_key.items():
        if set(pair) != {False, True}:
            continue
        off, on = pair[False], pair[True]
        diff = first_difference(off.token_ids, on.token_ids)
        out.append(PrefixCacheComparison(
            point=point, workers=workers, off_label=off.label, on_label=on.label, ttft_p50_off=off.ttft_p50,
            ttft_p50_on=on.ttft_p50, ttft_p50_ratio=ttft_ratio(off.ttft_p50, on.ttft_p50),
            requests=min(len(off.token_ids), len(on.token_ids)), tokens_identical=diff is None,
            first_difference=diff))
    return out


def mismatches(comparisons: tuple[PrefixCacheComparison, ...] | list[PrefixCacheComparison]) -> list[str]:
    """A line for each comparison whose tokens differ ([] when all are identical)."""
    return [f"{c.point}, workers={c.workers}: request {c.first_difference} differs between {c.off_label!r} and "
            f"{c.on_label!r}" for c in comparisons if not c.tokens_identical]


TABLE_HEADERS = ["point", "workers", "TTFT p50 ms, caching off", "TTFT p50 ms, caching on",
                 "off ÷ on (× lower with cache)", "requests", "same greedy tokens"]


def table_rows(comparisons: tuple[PrefixCacheComparison, ...]) -> list[list[str]]:
    def ms(seconds: float | None) -> str:
        return "–" if seconds is None else f"{1e3 * seconds:.0f}"

    return [[c.point, "–" if c.workers is None else str(c.workers), ms(c.ttft_p50_off), ms(c.ttft_p50_on),
             "–" if c.ttft_p50_ratio is None else f"{c.ttft_p50_ratio:.2f}×", str(c.requests),
             "yes" if c.tokens_identical else f"NO (request {c.first_difference})"] for c in comparisons]
