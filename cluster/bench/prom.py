"""Reads the gateway's Prometheus text: per-phase step seconds and finished-token counters."""

from __future__ import annotations

import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

PHASE_SUM = "mixserve_step_phase_seconds_sum"
GENERATED = "mixserve_generation_tokens_total"


def scrape(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """Flat samples: `name` or `name{label=value,...}` → value."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def phase_sums(samples: dict[str, float]) -> dict[str, float]:
    prefix = PHASE_SUM + "{phase="
    return {key[len(prefix):-1]: value for key, value in samples.items() if key.startswith(prefix)}


def phase_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    b, a = phase_sums(before), phase_sums(after)
    return {phase: a[phase] - b.get(phase, 0.0) for phase in a}


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
