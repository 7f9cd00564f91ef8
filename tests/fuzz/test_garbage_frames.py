"""Garbage on the gRPC port: 1,000 raw TCP connections that send random bytes, broken HTTP/2 prefaces, bad frames,
protocol violations and malformed gRPC messages on a real HTTP/2 stream; then undecodable protobuf through a
grpc channel. Every connection must end cleanly: after our side half-closes, the server closes (FIN, RST or
GOAWAY) within a deadline; a gRPC stream with a whole but bad message is answered (trailers or RST_STREAM) or
the connection dropped; an undecodable message gets INVALID_ARGUMENT or INTERNAL. Afterwards the server still
serves, says SERVING, holds no KV block and has not leaked sockets.

Known and tolerated: a unary-request stream that ends (END_STREAM) before one whole message arrived is never
answered by grpc.aio; the RPC waits until the connection closes. It is tallied as '+unanswered'.

The cases come from a seeded `random.Random`: a failure names its seed and case, and replays exactly.
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest

from protos import mixserve_pb2 as pb
from tests.fuzz.h2frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Connection,
    frame,
    grpc_headers,
    grpc_message,
    setting,
)
from tests.fuzz.live import assert_still_serving

CONNECTIONS = 1_000
UNDECODABLE_CALLS = 200
THREADS = 16
SEED = 20_260_101
CLOSE_DEADLINE_S = 10.0  # after our half-close, the server must close within this
METHODS = ("/mixserve.v1.MixServe/Generate", "/mixserve.v1.MixServe/GenerateStream",
           "/mixserve.v1.MixServe/GetModelInfo")
SMALL_REQUEST = pb.GenerateRequest(prompt_token_ids=[1, 2],
                                   sampling=pb.SamplingParams(max_new_tokens=2)).SerializeToString()


@dataclass(frozen=True)
class Case:
    kind: str
    data: bytes
    opens_stream: bool = False  # a well-formed HTTP/2 stream 1 for a MixServe method
    complete: bool = False  # ...that carries at least one whole gRPC message: the server must answer or drop it


def random_bytes(rng: random.Random, authority: str) -> Case:
    return Case("random bytes", rng.randbytes(rng.randint(1, 2048)))


def truncated_preface(rng: random.Random, authority: str) -> Case:
    tail = rng.randbytes(rng.randint(0, 64)) if rng.random() < 0.5 else b""
    return Case("truncated preface", PREFACE[: rng.randrange(len(PREFACE))] + tail)


def corrupt_preface(rng: random.Random, authority: str) -> Case:
    preface = bytearray(PREFACE)
    preface[rng.randrange(len(preface))] ^= rng.randint(1, 255)
    return Case("corrupt preface", bytes(preface) + rng.randbytes(rng.randint(0, 64)))


def other_protocols(rng: random.Random, authority: str) -> Case:
    return Case("other protocol", rng.choice([
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"POST /mixserve.v1.MixServe/Generate HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(64),  # a TLS ClientHello start
        b"\r\n" * 100, b"\x00" * 1000, PREFACE[:18],
    ]))


def preface_then_random(rng: random.Random, authority: str) -> Case:
    return Case("preface + random bytes", PREFACE + rng.randbytes(rng.randint(1, 1024)))


def random_frames(rng: random.Random, authority: str) -> Case:
    """Random type, flags and stream; a length field that may lie (zero, short, or up to 2^24 - 1)."""
    frames = []
    for _ in range(rng.randint(1, 8)):
        payload = rng.randbytes(rng.randint(0, 64))
        length = rng.choice([None, None, 0, 2**24 - 1, rng.randrange(2**24), len(payload) + rng.randint(1, 100)])
        kind = rng.choice([*range(10), rng.randint(10, 255)])
        stream = rng.choice([0, 1, 2, 3, rng.randrange(2**32)])
        frames.append(frame(kind, rng.randrange(256), stream, payload, length=length))
    return Case("random frames", PREFACE + frame(SETTINGS, 0, 0) + b"".join(frames))


def bad_settings(rng: random.Random, authority: str) -> Case:
    payload = rng.choice([
        setting(2, 2),  # ENABLE_PUSH must be 0 or 1
        setting(4, 2**31),  # INITIAL_WINDOW_SIZE above 2^31 - 1
        setting(5, 1), setting(5, 2**24),  # MAX_FRAME_SIZE outside [2^14, 2^24 - 1]
        rng.randbytes(rng.choice([1, 5, 7, 13])),  # not a multiple of 6
        setting(rng.randint(7, 65535), rng.randrange(2**32)) * rng.randint(1, 200),  # unknown ids, many
    ])
    stream = rng.choice([0, 0, 1])
    extra = frame(SETTINGS, 0x1, 0, b"\x00" * 6) if rng.random() < 0.3 else b""  # an ACK with a payload
    return Case("bad settings", PREFACE + frame(SETTINGS, 0, stream, payload) + extra)


def bad_header_block(rng: random.Random, authority: str) -> Case:
    good = grpc_headers(authority, rng.choice(METHODS))
    block = rng.choice([rng.randbytes(rng.randint(1, 200)), good[: rng.randrange(len(good))],
                        good + rng.randbytes(8), b"\xff" * 20, b"\x3f\xe1\xff\xff\xff\x0f"])  # table size overflow
    flags = END_HEADERS | rng.choice([0, END_STREAM])
    return Case("bad header block", PREFACE + frame(SETTINGS, 0, 0) + frame(HEADERS, flags, 1, block))


def protocol_violation(rng: random.Random, authority: str) -> Case:
    headers = grpc_headers(authority, METHODS[0])
    opened = frame(HEADERS, END_HEADERS, 1, headers)
    violation = rng.choice([
        frame(DATA, 0, 0, b"x"),  # DATA on stream 0
        frame(WINDOW_UPDATE, 0, 0, (0).to_bytes(4, "big")),  # zero increment
        frame(WINDOW_UPDATE, 0, 1, (2**31 - 1).to_bytes(4, "big")) * 2,  # window overflow
        frame(PING, 0, 0, b"x" * 7), frame(PING, 0, 1, b"x" * 8),  # wrong size, on a stream
        frame(RST_STREAM, 0, 5, bytes(4)),  # an idle stream
        frame(PRIORITY, 0, 1, (1).to_bytes(4, "big") + b"\x10"),  # depends on itself
        frame(CONTINUATION, END_HEADERS, 1, headers),  # no HEADERS open
        frame(HEADERS, END_HEADERS, 2, headers),  # an even (server) stream id
        frame(HEADERS, END_HEADERS, 1, headers),  # trailers without END_STREAM
        frame(GOAWAY, 0, 0, bytes(4) + (2).to_bytes(4, "big")),
        frame(DATA, 0, 1, b"x" * 70_000),  # over the frame size and the window
        frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")) + frame(DATA, 0, 1, b"late"),
        b"".join(frame(HEADERS, END_HEADERS, s, headers) for s in range(3, 403, 2)),  # 200 streams at once
    ])
    return Case("protocol violation", PREFACE + frame(SETTINGS, 0, 0) + opened + violation)


def bad_grpc_message(rng: random.Random, authority: str) -> Case:
    """A well-formed HTTP/2 stream whose gRPC body is wrong: the server must answer stream 1 or drop it."""
    payload = rng.randbytes(rng.randint(1, 300))
    name, body, complete = rng.choice([
        ("random protobuf", grpc_message(payload), True),
        ("compressed, no grpc-encoding", grpc_message(SMALL_REQUEST, compressed=1), True),
        ("bad compressed flag", grpc_message(payload, compressed=rng.randint(2, 255)), True),
        ("4 GiB announced", grpc_message(b"", length=2**32 - 1), True),  # the header alone is over the limit
        ("empty request", grpc_message(b""), True),
        ("two messages", grpc_message(SMALL_REQUEST) * 2, True),
        ("trailing garbage", grpc_message(SMALL_REQUEST) + payload, True),
        ("truncated message", grpc_message(payload, length=len(payload) + rng.randint(1, 1000)), False),
        ("truncated prefix", payload[:3], False),
        ("no message", b"", False),
    ])
    method = rng.choice(METHODS)
    stream = frame(HEADERS, END_HEADERS, 1, grpc_headers(authority, method))
    return Case(f"bad grpc message ({name}, {method.rsplit('/', 1)[1]})",
                PREFACE + frame(SETTINGS, 0, 0) + stream + frame(DATA, END_STREAM, 1, body), opens_stream=True,
                complete=complete)


BUILDERS: list[Callable[[random.Random, str], Case]] = [
    random_bytes, truncated_preface, corrupt_preface, other_protocols, preface_then_random, random_frames,
    bad_settings, bad_header_block, protocol_violation, bad_grpc_message,
]


def play(port: int, case: Case) -> str:
    """How the connection ended: 'eof', 'reset', 'goaway+eof', ..., or a failure starting with 'FAIL'.

    A stream with a whole message must be answered (or the connection dropped) while our side is still open.
    One without (no message, a truncated one) is only watched for a second: grpc.aio never answers such a
    stream, it waits for the client to go away (see the module docstring)."""
    conn = Connection(port, CLOSE_DEADLINE_S)
    answered = ""
    if conn.send(case.data) and case.opens_stream:
        conn.read_until(lambda r: r.stream_ended(1) or r.goaway, CLOSE_DEADLINE_S if case.complete else 1.0)
        if conn.reply.ended == "timeout":
            if case.complete:
                conn.sock.close()
                return "FAIL: stream 1 was neither answered nor dropped"
            conn.reply.ended = ""
        answered = "+answered" if conn.reply.stream_ended(1) else "+unanswered"
    reply = conn.finish(CLOSE_DEADLINE_S)
    if reply.ended == "timeout":
        return f"FAIL: still open {CLOSE_DEADLINE_S:.0f}s after our half-close ({reply.received} bytes received)"
    return f"{'goaway+' if reply.goaway else ''}{reply.ended}{answered}"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(600)
def test_garbage_connections_end_cleanly_and_the_server_keeps_serving(server):
    assert_still_serving(server)
    fds_before = open_fds()
    rng = random.Random(SEED)
    authority = server.target
    cases = [rng.choice(BUILDERS)(rng, authority) for _ in range(CONNECTIONS)]
    started = time.monotonic()
    with futures.ThreadPoolExecutor(THREADS) as pool:
        endings = list(pool.map(lambda case: play(server.gateway.port, case), cases))
    seconds = time.monotonic() - started
    tally = Counter(f"{case.kind}: {ending}" for case, ending in zip(cases, endings, strict=True))
    print(json.dumps({"connections": len(cases), "seconds": round(seconds, 1), "endings": dict(sorted(tally.items()))}))
    failures = [f"case {i} ({case.kind}, seed {SEED}): {ending}; sent {case.data[:48].hex()}..."
                for i, (case, ending) in enumerate(zip(cases, endings, strict=True)) if ending.startswith("FAIL")]
    assert not failures, "\n".join(failures[:20])
    assert_still_serving(server)
    deadline = time.monotonic() + 10
    while open_fds() > fds_before + 16 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_fds() <= fds_before + 16, f"{open_fds() - fds_before} more open files after the garbage (leak?)"


def call_raw(channel: grpc.Channel, method: str, payload: bytes) -> tuple[str, str]:
    """Sends bytes as the request message (no serializer): (status name, details)."""
    try:
        if method.endswith("GenerateStream"):
            list(channel.unary_stream(method)(payload, timeout=30))
        else:
            channel.unary_unary(method)(payload, timeout=30)
        return "OK", ""
    except grpc.RpcError as exc:
        return exc.code().name, exc.details() or ""


@pytest.mark.timeout(300)
def test_undecodable_protobuf_gets_invalid_argument_or_internal(server):
    rng = random.Random(SEED + 1)
    codes: Counter = Counter()
    bad: list[str] = []
    for i in range(UNDECODABLE_CALLS):
        method = METHODS[i % len(METHODS)]
        payload = rng.choice([b"\xff\xff\xff", b"\x0a\x05ab", rng.randbytes(rng.randint(1, 200))])
        code, details = call_raw(server.channel, method, payload)
        codes[code] += 1
        if code not in {"OK", "INVALID_ARGUMENT", "INTERNAL", "RESOURCE_EXHAUSTED"}:
            bad.append(f"{method} {payload[:24].hex()}: {code} {details[:200]}")
    print(json.dumps({"calls": UNDECODABLE_CALLS, "codes": dict(codes)}))
    assert not bad, f"{len(bad)} of {UNDECODABLE_CALLS} undecodable messages got an unclean status, e.g.\n" + \
        "\n".join(bad[:5])
    assert_still_serving(server)
