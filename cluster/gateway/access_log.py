"""One INFO line per finished request on the `mixserve.access` logger, as HTTP servers write an access log:
the API, the client's request id, the status (a gRPC code name for both APIs, as in the metrics), the finish
reason, prompt and completion tokens, time to first token and total seconds. The id is the client's own
string, so it is written with repr(): a newline in it cannot forge a line."""

from __future__ import annotations

import logging

log = logging.getLogger("mixserve.access")


def log_request(
    *, api: str, request_id: str, code: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
    ttft_s: float | None, total_s: float,
) -> None:
    ttft = "-" if ttft_s is None else f"{ttft_s:.3f}s"
    log.info("%s %r %s finish=%s prompt=%d completion=%d ttft=%s total=%.3fs", api, request_id, code, finish_reason,
             prompt_tokens, completion_tokens, ttft, total_s)
