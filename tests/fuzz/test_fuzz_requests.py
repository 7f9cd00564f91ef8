"""Property-based fuzzing of every GenerateRequest field against a live gateway with one expert worker.

Every call, unary or streaming, waited for or cut short by its own deadline or a cancel, must end with a clean
status: OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED, plus DEADLINE_EXCEEDED / CANCELLED where the client caused
them; never UNKNOWN, INTERNAL or UNAVAILABLE, never a hang (every call has a deadline). The status must match
what the documented limits predict, and every OK answer must be self-consistent. Afterwards the server still
serves, says SERVING, and holds no KV block.

Hypothesis is the generator: each example is a batch of calls, handed to a thread pool that keeps them flowing.
Outcomes are tallied over the whole run and violations reported together at the end with the request that
caused each (no shrinking: concurrent calls do not shrink to one cause; the printed request is the cause).
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import math
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cluster.tokenizer import TextTokenizer
from protos import mixserve_pb2 as pb
from tests.fuzz.live import assert_still_serving, status_codes
from tests.fuzz.strategies import VOCAB, Call, calls, effective_max_new, predicted_code

FUZZ_REQUESTS = 10_000  # fuzzed calls in one run
BATCH = 32  # calls per hypothesis example, sent together
THREADS = 16
MAX_VIOLATIONS = 25  # stop sending after this many: the server is broken, the rest is noise

CLEAN = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
CLIENT_CAUSED = {"wait": set(), "deadline": {"DEADLINE_EXCEEDED"}, "cancel": {"CANCELLED"}}
FINISH_REASONS = {"stop", "length", "eos"}


@dataclass
class Outcome:
    code: str
    details: str = ""
    seconds: float = 0.0
    response: pb.GenerateResponse | None = None  # a unary OK
    chunks: list[pb.GenerateStreamResponse] = field(default_factory=list)


def send(stub, call: Call) -> Outcome:
    started = time.monotonic()
    outcome = (_stream if call.streaming else _unary)(stub, call)
    outcome.seconds = time.monotonic() - started
    return outcome


def _unary(stub, call: Call) -> Outcome:
    future = stub.Generate.future(call.request, timeout=call.deadline_s)
    if call.client == "cancel":
        time.sleep(call.cancel_after)
        future.cancel()
    try:
        return Outcome("OK", response=future.result())
    except grpc.FutureCancelledError:
        return Outcome("CANCELLED", "cancelled by the client")
    except grpc.RpcError as exc:
        return Outcome(exc.code().name, exc.details() or "")


def _stream(stub, call: Call) -> Outcome:
    stream = stub.GenerateStream(call.request, timeout=call.deadline_s)
    chunks: list[pb.GenerateStreamResponse] = []
    cancel_at = int(call.cancel_after) if call.client == "cancel" else -1
    try:
        if cancel_at == 0:
            stream.cancel()
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == cancel_at:
                stream.cancel()
    except grpc.RpcError as exc:
        return Outcome(exc.code().name, exc.details() or "", chunks=chunks)
    return Outcome("OK", chunks=chunks)


class Oracle:
    """What the served model's limits say about a request and its answer."""

    def __init__(self, server) -> None:
        self.cfg = server.engine.cfg
        self.limits = server.gateway.options.limits
        self.max_message_bytes = server.gateway.options.security.max_message_bytes
        self.tokenizer = TextTokenizer.from_model_dir(server.engine.settings.model_dir, self.cfg.bos_token_id)
        assert self.cfg.vocab_size == VOCAB, f"the strategies assume vocab {VOCAB}, the model has {self.cfg.vocab_size}"

    def violations(self, call: Call, outcome: Outcome) -> list[str]:
        if outcome.code not in CLEAN | CLIENT_CAUSED[call.client]:
            hung = outcome.code == "DEADLINE_EXCEEDED"
            return [f"{'hang' if hung else outcome.code}: {outcome.details[:300]} (after {outcome.seconds:.1f}s)"]
        if outcome.code in CLIENT_CAUSED[call.client]:
            early = [i for i, c in enumerate(outcome.chunks[:-1]) if c.finish_reason]
            return [f"chunk {i} of {len(outcome.chunks)} of a cut stream has a finish_reason" for i in early]
        predicted = predicted_code(call.request, self.cfg, self.tokenizer, self.limits, self.max_message_bytes)
        if outcome.code != predicted and not _duplicate_id(call, outcome):
            return [f"{outcome.code} where the limits predict {predicted}: {outcome.details[:300]}"]
        if outcome.code != "OK":
            return []
        if call.streaming:
            problems = _chunk_violations(outcome.chunks)
            if problems:
                return problems
            return self.answer_violations(call.request, _join(outcome.chunks))
        return self.answer_violations(call.request, outcome.response)

    def answer_violations(self, request: pb.GenerateRequest, answer: pb.GenerateResponse) -> list[str]:
        s, ids, usage, reason = request.sampling, list(answer.token_ids), answer.usage, answer.finish_reason
        max_new, context = effective_max_new(request), self.cfg.max_position_embeddings
        eos = set(self.cfg.eos_token_ids)
        checks = {
            "finish_reason in stop/length/eos": reason in FINISH_REASONS,
            "len(token_ids) == completion_tokens": len(ids) == usage.completion_tokens,
            "1 <= completion_tokens <= max_new_tokens": 1 <= usage.completion_tokens <= max_new,
            "total_tokens == prompt + completion": usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens == len(prompt_token_ids)": not request.prompt_token_ids
            or usage.prompt_tokens == len(request.prompt_token_ids),
            "prompt + completion <= context": usage.total_tokens <= context,
            "token ids in the vocabulary": all(0 <= t < self.cfg.vocab_size for t in ids),
            "request_id echoed (or assigned)": answer.request_id == request.request_id
            or (not request.request_id and bool(answer.request_id)),
            "logprobs only when asked, one per token": len(answer.logprobs) == (len(ids) if s.logprobs else 0),
            "logprobs are log-probabilities": all(lp <= 1e-4 for lp in answer.logprobs)
            and not any(math.isnan(lp) for lp in answer.logprobs),
            "length means max_new_tokens or a full context": reason != "length"
            or len(ids) == max_new or usage.total_tokens >= context,
            "eos only when not ignored, as the last token": reason != "eos"
            or (not s.ignore_eos and bool(ids) and ids[-1] in eos),
            "stop means a stop id last or a stop string": reason != "stop"
            or bool(s.stop) or (bool(ids) and ids[-1] in s.stop_token_ids),
            "no stop id before the last token": not set(ids[:-1]) & set(s.stop_token_ids),
            "no eos before the last token unless ignored": s.ignore_eos or not set(ids[:-1]) & eos,
            "no stop string in the text": not any(x in answer.text for x in s.stop),
            "timings are non-negative": answer.timings.total_seconds >= 0,
        }
        return [f"{name} fails: {_brief(answer)}" for name, ok in checks.items() if not ok]


def _duplicate_id(call: Call, outcome: Outcome) -> bool:
    """Two in-flight calls with the same client id: the later one is rightly refused."""
    return outcome.code == "INVALID_ARGUMENT" and bool(call.request.request_id) and (
        "already in flight" in outcome.details or "already running" in outcome.details)


def _chunk_violations(chunks: list[pb.GenerateStreamResponse]) -> list[str]:
    if not chunks:
        return ["an OK stream sent no chunk"]
    last = chunks[-1]
    checks = {
        "only the last chunk has a finish_reason": all(not c.finish_reason for c in chunks[:-1])
        and bool(last.finish_reason),
        "only the last chunk has usage and timings": all(not c.HasField("usage") for c in chunks[:-1])
        and last.HasField("usage") and last.HasField("timings"),
        "one request_id on every chunk": len({c.request_id for c in chunks}) == 1,
    }
    return [f"{name} fails ({len(chunks)} chunks)" for name, ok in checks.items() if not ok]


def _join(chunks: list[pb.GenerateStreamResponse]) -> pb.GenerateResponse:
    last = chunks[-1]
    return pb.GenerateResponse(
        request_id=last.request_id, text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids], logprobs=[lp for c in chunks for lp in c.logprobs],
        finish_reason=last.finish_reason, usage=last.usage, timings=last.timings,
    )


def _brief(answer: pb.GenerateResponse) -> str:
    return (f"reason={answer.finish_reason!r} ids={list(answer.token_ids)[:20]} usage=({answer.usage.prompt_tokens}, "
            f"{answer.usage.completion_tokens}, {answer.usage.total_tokens}) logprobs={len(answer.logprobs)} "
            f"text={answer.text[:60]!r}")


@dataclass
class Tally:
    codes: Counter = field(default_factory=Counter)  # (unary|stream, client action, code) -> calls
    violations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def num_violations(self) -> int:
        return sum(len(v) for v in self.violations.values())

    def record(self, call: Call, code: str, problems: list[str]) -> None:
        with self.lock:
            self.sent += 1
            self.codes[("stream" if call.streaming else "unary", call.client, code)] += 1
            for problem in problems:
                self.violations[problem.split(":")[0]].append(f"{problem}\n      request: {call.describe()}")

    def report(self) -> str:
        return "\n".join(f"{kind} ({len(cases)}x), e.g.\n    " + "\n    ".join(cases[:3])
                         for kind, cases in self.violations.items())

    def summary(self) -> dict:
        by_code = Counter()
        for (_, _, code), n in self.codes.items():
            by_code[code] += n
        return {"sent": self.sent, "by_code": dict(by_code),
                "by_call": {"/".join(key): n for key, n in sorted(self.codes.items())}}


class Pipeline:
    """Sends calls from a thread pool without waiting for one batch before the next: a slow call (a long
    generation, a short deadline) holds one thread, not the run. At most 2 x THREADS calls are queued."""

    def __init__(self, server, oracle: Oracle, tally: Tally, pool: futures.ThreadPoolExecutor) -> None:
        self.server, self.oracle, self.tally, self.pool = server, oracle, tally, pool
        self.slots = threading.BoundedSemaphore(2 * THREADS)

    def submit(self, call: Call) -> None:
        self.slots.acquire()
        self.pool.submit(self._one, call)

    def _one(self, call: Call) -> None:
        try:
            outcome = send(self.server.stub, call)
            self.tally.record(call, outcome.code, self.oracle.violations(call, outcome))
        except Exception as exc:  # a bug in the test itself must not vanish in a pool thread
            self.tally.record(call, "TEST-ERROR", [f"TEST-ERROR: {exc!r}"])
        finally:
            self.slots.release()


@pytest.mark.timeout(900)
def test_fuzzed_requests_get_clean_answers_and_leave_no_trace(server):
    oracle, tally = Oracle(server), Tally()
    started = time.monotonic()
    with futures.ThreadPoolExecutor(THREADS, thread_name_prefix="fuzz") as pool:
        pipeline = Pipeline(server, oracle, tally, pool)

        @settings(max_examples=math.ceil(FUZZ_REQUESTS / BATCH), deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(st.lists(calls(), min_size=BATCH, max_size=BATCH))
        def run_batch(batch: list[Call]) -> None:
            for call in batch:
                if tally.num_violations < MAX_VIOLATIONS:
                    pipeline.submit(call)

        run_batch()
    seconds = time.monotonic() - started
    print(json.dumps({**tally.summary(), "seconds": round(seconds, 1),
                      "ms_per_request": round(1000 * seconds / max(tally.sent, 1), 2)}))
    assert not tally.violations, f"{tally.num_violations} violations in {tally.sent} calls:\n{tally.report()}"
    assert tally.sent >= FUZZ_REQUESTS
    text = assert_still_serving(server)
    assert status_codes(text) <= CLEAN | {"DEADLINE_EXCEEDED", "CANCELLED"}, status_codes(text)


def _greedy(ids: list[int], max_new: int, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt_token_ids=ids, sampling=pb.SamplingParams(
        max_new_tokens=max_new, temperature=0.0, ignore_eos=True), **fields)


@pytest.mark.timeout(120)
def test_a_tiny_positive_temperature_does_not_take_the_engine_down(fresh_server):
    """Found by the fuzzer: logits / 1e-45 overflow to inf, softmax gives NaN, torch.multinomial raises inside the
    engine step, and every in-flight request is lost (UNAVAILABLE) while the engine restarts."""
    bystander = fresh_server.stub.GenerateStream(_greedy([1, 7, 9], 40), timeout=60)
    got = list(next(bystander).token_ids)
    for temperature in (1e-38, 1e-40, 1e-45):  # a float32 subnormal; 1e-45 is the smallest
        request = pb.GenerateRequest(prompt_token_ids=[1, 2, 3], sampling=pb.SamplingParams(
            max_new_tokens=3, temperature=temperature, ignore_eos=True))
        try:
            assert fresh_server.stub.Generate(request, timeout=30).usage.completion_tokens == 3
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (temperature, exc.code(), exc.details())
    got += [t for c in bystander for t in c.token_ids]
    assert len(got) == 40
    assert_still_serving(fresh_server)


@pytest.mark.timeout(120)
def test_a_duplicate_request_id_does_not_strand_the_call_that_holds_it(fresh_server):
    """Found by the fuzzer: the refused duplicate releases the stream of the id's first call, which then never
    hears from the engine again and hangs until its deadline."""
    first = fresh_server.stub.GenerateStream(_greedy([1, 7, 9], 40, request_id="same-id"), timeout=20)
    got = list(next(first).token_ids)
    with pytest.raises(grpc.RpcError) as err:
        fresh_server.stub.Generate(_greedy([1, 2], 2, request_id="same-id"), timeout=20)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    got += [t for c in first for t in c.token_ids]
    assert len(got) == 40
    assert_still_serving(fresh_server)
