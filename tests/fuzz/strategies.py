"""Hypothesis strategies for hostile `mixserve.v1.GenerateRequest`s and the calls that carry them.

Every field gets valid, boundary and garbage values; valid draws mostly ask for at most 4 new tokens so a run of
thousands stays cheap. Also the contract oracle: what status the documented limits predict for a request.
Knows nothing of a live server: model limits come in as a `ModelConfig` and `RequestLimits`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

from hypothesis import strategies as st

from cluster.gateway.validation import DEFAULT_MAX_NEW_TOKENS, RequestLimits
from cluster.tokenizer import TextTokenizer
from protos import mixserve_pb2 as pb
from workers.config import ModelConfig

VOCAB = 320  # tests.tiny_models.write_served_model
HANG_GUARD_S = 30.0  # the deadline of every call that sets none of its own: past it, the server hung

CHARS = st.characters(exclude_categories=("Cs",))  # protobuf strings cannot hold lone surrogates
TEXT = st.text(CHARS, max_size=40)
INT32 = st.integers(-(2**31), 2**31 - 1)
VALID_ID = st.integers(0, VOCAB - 1)
ANY_ID = st.one_of(VALID_ID, INT32, st.sampled_from([-1, VOCAB, 2**31 - 1, -(2**31)]))
ANY_FLOAT32 = st.floats(width=32)  # NaN, ±inf, ±0, subnormals, huge
FLOAT32_EDGES = st.sampled_from([  # drawn by name: random floats reach the subnormals only now and then
    0.0, -0.0, 1e-45, -1e-45, 1e-40, 1e-38, 1.1754944e-38, 1e-30, 1e-7, 1.0, 1.0000001, 3.4028235e38,
    math.inf, -math.inf, math.nan])


def repeated(unit: st.SearchStrategy, times: st.SearchStrategy[int]) -> st.SearchStrategy:
    """A short draw repeated many times: huge strings and lists without drawing every element."""
    return st.builds(operator.mul, unit, times)


class Weighted:
    """Picks one of several strategies with integer weights (built once: strategies are costly to construct).

    Hypothesis favours the ends of an integer range, so the first and last choices come up more often than
    their weight says: keep costly choices (huge messages, long generations) away from the ends."""

    def __init__(self, *choices: tuple[int, st.SearchStrategy]) -> None:
        self.choices = choices
        self.pick = st.integers(0, sum(weight for weight, _ in choices) - 1)

    def draw(self, draw):
        pick = draw(self.pick)
        for weight, strategy in self.choices:
            if pick < weight:
                return draw(strategy)
            pick -= weight
        raise AssertionError("unreachable")


REQUEST_IDS = Weighted(
    (210, st.just("")),  # the server assigns one
    (60, TEXT),  # often "" or "0": concurrent duplicates happen
    (12, st.sampled_from(["dup", "🦀-dup", "0"])),
    (1, repeated(st.just("𝔘"), st.integers(1_050_000, 1_100_000))),  # over the 4 MiB message limit
    (17, repeated(st.text(CHARS, min_size=1, max_size=4), st.integers(60, 600))),  # around the 256 limit
)
PROMPT_IDS = Weighted(
    (120, st.lists(VALID_ID, min_size=1, max_size=32)),
    (8, repeated(st.lists(VALID_ID, min_size=1, max_size=2), st.integers(100, 160))),  # around the context
    (5, repeated(st.lists(ANY_ID, min_size=1, max_size=2), st.integers(1_000, 20_000))),
    (1, repeated(st.sampled_from([[-1], [2**31 - 1]]), st.integers(450_000, 500_000))),  # > 4 MiB
    (16, st.lists(ANY_ID, max_size=40)),
)
PROMPT_TEXT = Weighted(
    (75, st.text(CHARS, min_size=1, max_size=60)),
    (3, repeated(st.text(CHARS, min_size=4, max_size=8), st.integers(50_000, 60_000))),  # > 200k characters
    (1, repeated(st.text(CHARS, min_size=1, max_size=4), st.integers(40_000, 50_000))),  # up to 200k: tokenized
    (1, repeated(st.just("𝔘"), st.integers(1_050_000, 1_100_000))),  # > 4 MiB
    (20, repeated(st.text(CHARS, min_size=1, max_size=8), st.integers(20, 600))),  # past the context
)
PROMPT_KIND = Weighted((70, st.just("ids")), (22, st.just("text")), (4, st.just("both")), (4, st.just("neither")))
STOP = Weighted(
    (80, st.just([])),
    (10, st.lists(st.text(CHARS, min_size=1, max_size=6), min_size=1, max_size=3)),
    (3, st.lists(TEXT, min_size=1, max_size=4)),  # "" is invalid
    (3, st.lists(st.text(CHARS, min_size=1, max_size=3), min_size=15, max_size=40)),  # around the 16 limit
    (4, st.lists(repeated(st.text(CHARS, min_size=1, max_size=3), st.integers(50, 2_000)), min_size=1,
                 max_size=2)),  # around the 256-character limit
)
MAX_NEW = Weighted(
    (20, st.none()),  # the default, 16
    (370, st.integers(1, 4)),
    (25, st.integers(5, 40)),
    (1, st.just(4096)),  # the largest valid value: runs to the end of the context
    (84, st.one_of(st.sampled_from([0, -1, -(2**31), 2**31 - 1, 4097, 100_000]), INT32)),
)
TEMPERATURE = Weighted((15, st.none()), (25, st.just(0.0)), (25, st.floats(0.05, 2.0)), (5, FLOAT32_EDGES),
                       (30, ANY_FLOAT32))
TOP_P = Weighted((40, st.none()), (30, st.floats(0.01, 1.0)), (5, FLOAT32_EDGES), (25, ANY_FLOAT32))
TOP_K = Weighted((60, st.just(0)), (25, st.integers(1, 400)), (15, INT32))
SEED = Weighted((50, st.none()), (50, st.integers(0, 2**64 - 1)))
STOP_IDS = Weighted((80, st.just([])), (15, st.lists(VALID_ID, min_size=1, max_size=4)),
                    (5, st.lists(ANY_ID, max_size=40)))
CLIENT = Weighted((80, st.just("wait")), (10, st.just("deadline")), (10, st.just("cancel")))


@st.composite
def prompts(draw) -> tuple[str, list[int]]:
    """(prompt, prompt_token_ids): usually exactly one set."""
    kind = PROMPT_KIND.draw(draw)
    text = PROMPT_TEXT.draw(draw) if kind in ("text", "both") else ""
    ids = PROMPT_IDS.draw(draw) if kind in ("ids", "both") else []
    return text, ids


@st.composite
def sampling_params(draw) -> pb.SamplingParams | None:
    if draw(st.integers(0, 49)) == 0:
        return None  # all defaults: 16 new tokens at temperature 1
    fields = {
        "max_new_tokens": MAX_NEW.draw(draw), "temperature": TEMPERATURE.draw(draw), "top_p": TOP_P.draw(draw),
        "top_k": TOP_K.draw(draw), "seed": SEED.draw(draw), "stop": STOP.draw(draw),
        "stop_token_ids": STOP_IDS.draw(draw), "ignore_eos": draw(st.booleans()), "logprobs": draw(st.booleans()),
    }
    return pb.SamplingParams(**{k: v for k, v in fields.items() if v is not None})


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    prompt, ids = draw(prompts())
    request = pb.GenerateRequest(request_id=REQUEST_IDS.draw(draw), prompt=prompt, prompt_token_ids=ids)
    sampling = draw(sampling_params())
    if sampling is not None:
        request.sampling.CopyFrom(sampling)
    return request


@dataclass(frozen=True)
class Call:
    """One RPC: the request, unary or streaming, and what the client does to it."""

    request: pb.GenerateRequest
    streaming: bool
    client: str = "wait"  # "wait" (for the answer), "deadline" (a short one of its own) or "cancel"
    deadline_s: float = HANG_GUARD_S
    cancel_after: float = 0.0  # unary: seconds before cancel(); streaming: chunks read before cancel()

    def describe(self, limit: int = 600) -> str:
        text = repr(self.request)
        short = text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"
        return f"{'stream' if self.streaming else 'unary'}/{self.client} {short}"


@st.composite
def calls(draw) -> Call:
    request = draw(generate_requests())
    streaming = draw(st.booleans())
    kind = CLIENT.draw(draw)
    if kind == "deadline":
        return Call(request, streaming, kind, deadline_s=draw(st.floats(0.001, 0.5)))
    if kind == "cancel":
        after = draw(st.integers(0, 3)) if streaming else draw(st.floats(0.0, 0.05))
        return Call(request, streaming, kind, cancel_after=after)
    return Call(request, streaming)


def predicted_code(request: pb.GenerateRequest, cfg: ModelConfig, tokenizer: TextTokenizer,
                   limits: RequestLimits, max_message_bytes: int) -> str:
    """The status the documented limits predict: OK, INVALID_ARGUMENT, or RESOURCE_EXHAUSTED (too large)."""
    if request.ByteSize() > max_message_bytes:
        return "RESOURCE_EXHAUSTED"
    return "INVALID_ARGUMENT" if _invalid_field(request, cfg, tokenizer, limits) else "OK"


def _invalid_field(request: pb.GenerateRequest, cfg: ModelConfig, tokenizer: TextTokenizer,
                   limits: RequestLimits) -> str | None:
    s = request.sampling
    in_vocab = all(0 <= t < cfg.vocab_size for t in request.prompt_token_ids)
    checks = {
        "request_id": len(request.request_id) <= limits.max_request_id_chars,
        "prompt": bool(request.prompt) != bool(request.prompt_token_ids),
        "prompt_token_ids": in_vocab and len(request.prompt_token_ids) < cfg.max_position_embeddings,
        "prompt text": len(request.prompt) <= limits.max_prompt_chars,
        "max_new_tokens": 1 <= effective_max_new(request) <= limits.max_new_tokens,
        "temperature": not s.HasField("temperature") or (math.isfinite(s.temperature) and s.temperature >= 0),
        "top_p": not s.HasField("top_p") or (math.isfinite(s.top_p) and 0 < s.top_p <= 1),
        "top_k": s.top_k >= 0,
        "stop": len(s.stop) <= limits.max_stop_strings
        and all(0 < len(x) <= limits.max_stop_chars for x in s.stop),
        "stop_token_ids": len(s.stop_token_ids) <= limits.max_stop_strings
        and all(0 <= t < cfg.vocab_size for t in s.stop_token_ids),
    }
    bad = next((name for name, ok in checks.items() if not ok), None)
    if bad is None and request.prompt and len(tokenizer.encode(request.prompt)) >= cfg.max_position_embeddings:
        bad = "prompt tokens"
    if bad is None and s.HasField("max_new_tokens"):  # an explicit max_new_tokens must fit the context
        num_prompt = len(request.prompt_token_ids) or len(tokenizer.encode(request.prompt))
        if num_prompt + s.max_new_tokens > cfg.max_position_embeddings:
            bad = "context"
    return bad


def effective_max_new(request: pb.GenerateRequest) -> int:
    s = request.sampling
    return s.max_new_tokens if s.HasField("max_new_tokens") else DEFAULT_MAX_NEW_TOKENS
