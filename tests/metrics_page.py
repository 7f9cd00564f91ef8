"""Reading a live gateway's Prometheus page in tests."""

from __future__ import annotations

import re
import urllib.request


def metrics_text(server) -> str:
    return urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()


def metric(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` whose labels include every label in `labels` ('{a="x",b="y"}')."""
    wanted = set(re.findall(r'(\w+)="([^"]*)"', labels))
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M):
        if wanted <= set(re.findall(r'(\w+)="([^"]*)"', match.group(1) or "")):
            total += float(match.group(2))
    return total
