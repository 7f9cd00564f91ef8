"""A tqdm progress bar over generated tokens (stderr), or a no-op when progress is off."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def token_bar(total: int, desc: str, *, enabled: bool) -> Iterator[tqdm]:
    with tqdm(total=total, desc=desc, unit="tok", disable=not enabled, leave=False, dynamic_ncols=True) as bar:
        yield bar
