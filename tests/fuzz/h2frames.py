"""Hand-built HTTP/2 bytes for hostile clients: frames, a literal-only HPACK header block, gRPC messages, and
a reader that sorts what the server sends back. No HTTP/2 library: the point is to send what one never would.

Frame layout (RFC 9113 §4.1): 24-bit length, 8-bit type, 8-bit flags, 1 reserved bit + 31-bit stream id.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes = b"", *, length: int | None = None) -> bytes:
    """One frame; `length` overrides the length field (a lie about the payload that follows)."""
    n = len(payload) if length is None else length
    return n.to_bytes(3, "big") + bytes([kind, flags]) + (stream & 0xFFFFFFFF).to_bytes(4, "big") + payload


def setting(ident: int, value: int) -> bytes:
    return ident.to_bytes(2, "big") + value.to_bytes(4, "big")


def hpack_literal(headers: list[tuple[str, str]]) -> bytes:
    """A header block of 'literal without indexing, new name' fields, no Huffman (RFC 7541 §6.2.2)."""
    out = bytearray()
    for name, value in headers:
        n, v = name.encode(), value.encode()
        assert len(n) < 127 and len(v) < 127, "one-byte length prefixes only"
        out += b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v
    return bytes(out)


def grpc_headers(authority: str, method: str) -> bytes:
    return hpack_literal([(":method", "POST"), (":scheme", "http"), (":path", method), (":authority", authority),
                          ("content-type", "application/grpc"), ("te", "trailers")])


def grpc_message(payload: bytes, *, compressed: int = 0, length: int | None = None) -> bytes:
    """gRPC length-prefixed message (1-byte compressed flag, 4-byte length); `length` may lie."""
    n = len(payload) if length is None else length
    return bytes([compressed]) + n.to_bytes(4, "big") + payload


@dataclass
class Reply:
    """What came back on one connection."""

    ended: str = ""  # "eof", "reset", or "timeout" (the server kept the connection open past the deadline)
    frames: list[tuple[int, int, int]] = field(default_factory=list)  # (type, flags, stream) of whole frames
    received: int = 0

    @property
    def goaway(self) -> bool:
        return any(kind == GOAWAY for kind, _, _ in self.frames)

    def stream_ended(self, stream: int) -> bool:
        """The server closed `stream`: trailers (HEADERS with END_STREAM) or RST_STREAM."""
        return any(s == stream and (kind == RST_STREAM or (kind == HEADERS and flags & END_STREAM))
                   for kind, flags, s in self.frames)


class Connection:
    """A raw TCP connection to the gateway that parses whole server frames as they arrive."""

    def __init__(self, port: int, timeout_s: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self.reply = Reply()
        self._buffer = b""

    def send(self, data: bytes) -> bool:
        """False when the server already closed or reset the connection (a clean refusal)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def read_until(self, done, deadline_s: float) -> None:
        """Reads until done(reply) holds, the server closes, or the deadline passes."""
        end = time.monotonic() + deadline_s
        while not self.reply.ended and not done(self.reply):
            self.sock.settimeout(max(end - time.monotonic(), 0.001))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                self.reply.ended = "timeout"
                return
            except ConnectionResetError:
                self.reply.ended = "reset"
                return
            if not chunk:
                self.reply.ended = "eof"
                return
            self.reply.received += len(chunk)
            self._parse(chunk)

    def finish(self, deadline_s: float) -> Reply:
        """Half-closes our side and waits for the server to close its side."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.reply.ended = self.reply.ended or "reset"
        self.read_until(lambda _: False, deadline_s)
        self.sock.close()
        return self.reply

    def _parse(self, chunk: bytes) -> None:
        self._buffer += chunk
        while len(self._buffer) >= 9:
            length = int.from_bytes(self._buffer[:3], "big")
            if len(self._buffer) < 9 + length:
                return
            kind, flags = self._buffer[3], self._buffer[4]
            stream = int.from_bytes(self._buffer[5:9], "big") & 0x7FFFFFFF
            self.reply.frames.append((kind, flags, stream))
            if kind == SETTINGS and not flags & ACK:
                self.send(frame(SETTINGS, ACK, 0))
            self._buffer = self._buffer[9 + length:]
