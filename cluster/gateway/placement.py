"""Which coordinator takes a request (several coordinators, `--coordinators M`): the one with the least
outstanding KV tokens.

A request's footprint is what it will hold in its coordinator's KV cache by its end: prompt plus the tokens it
may still generate. The gateway knows every stream it placed, so the sum per coordinator is exact and current,
where the engine's own numbers (KV usage, queue length in each update batch's stats) lag by a step and do not
yet count requests in flight to it. Ties go to the lowest index, so placement is deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable

from cluster.requests import GenerationRequest


def footprint(request: GenerationRequest) -> int:
    """KV tokens `request` holds by its end (a replay's continuation has the same: its prompt took in the
    tokens received, its max_new_tokens gave them up)."""
    return len(request.prompt_token_ids) + request.max_new_tokens


def least_loaded(num_coordinators: int, placed: Iterable[tuple[int, int]]) -> int:
    """The coordinator to place the next request on, given (coordinator, footprint) of those in flight."""
    loads = [0] * num_coordinators
    for coordinator, tokens in placed:
        loads[coordinator] += tokens
    return min(range(num_coordinators), key=lambda c: (loads[c], c))
