"""The coordinator pushes every step's updates to one subscriber (the gateway, or an offline driver) over
a socket, from the engine thread itself.

Why not a Ray call per step: on a host whose cores the engine's OpenMP team fills, each call wakes the
coordinator's Ray threads and takes the GIL from the engine between its ops (measured on W1: the same
engine 0.72-0.75 s in a bare actor, 1.0-1.17 s drained once a step). A send from the engine thread wakes
nothing in the coordinator's process. vLLM's engine core pushes its outputs to the API server the same way
(over ZMQ).

Security: the subscriber listens on its node's address with a fresh random 32-byte key, and hands the
address and key to the coordinator over Ray (token-authenticated). Both ends prove they hold the key
(`multiprocessing.connection`'s HMAC challenge, both ways) before anything is unpickled.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import TypeVar

from cluster.engine_stats import StatsSnapshot
from cluster.requests import SequenceUpdate


class ChannelClosed(ConnectionError):
    """The other end of an update channel went away (or never completed the handshake)."""


T = TypeVar("T")


class _SharedConnection:
    """A connected socket and its Connection, used by one thread and closed by any: close() only shuts the
    socket down (waking a blocked user) while the user is inside; the last one out closes the descriptors.
    A descriptor closed under a thread still using it may be reused by the next socket the process opens,
    and that thread would then read or close someone else's (seen as EBADF during a restart)."""

    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock, self.conn = sock, conn
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    def use(self, operation: Callable[[Connection], T]) -> T:
        with self._lock:
            if self._closed:
                raise ChannelClosed("the update channel is closed")
            self._users += 1
        try:
            return operation(self.conn)
        finally:
            with self._lock:
                self._users -= 1
                last_out = self._closed and not self._users
            if last_out:
                _close(self.sock, self.conn)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            in_use = self._users > 0
        if in_use:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the user, who closes on the way out
        else:
            _close(self.sock, self.conn)


@dataclass(frozen=True)
class ChannelAddress:
    host: str
    port: int
    authkey: bytes = field(repr=False)


@dataclass(frozen=True)
class UpdateBatch:
    updates: list[SequenceUpdate]
    stats: StatsSnapshot | None  # the engine's stats since the previous batch


class UpdatePublisher:
    """The coordinator's end. Connects from a Ray method thread (never the engine's), then only the
    engine thread sends."""

    def __init__(self, address: ChannelAddress, *, timeout_s: float = 30.0) -> None:
        try:
            sock = socket.create_connection((address.host, address.port), timeout=timeout_s)
        except OSError as exc:
            raise ChannelClosed(f"cannot reach the subscriber at {address.host}:{address.port}: {exc}") from exc
        sock, conn = _authenticated(sock, address.authkey, timeout_s, accepting=False)
        # a subscriber that stops reading fails a send after timeout_s instead of stalling the engine
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout_s))
        self._channel = _SharedConnection(sock, conn)

    def send(self, batch: UpdateBatch) -> None:
        try:
            self._channel.use(lambda conn: conn.send(batch))
        except OSError as exc:
            raise ChannelClosed(f"the subscriber went away: {exc}") from exc

    def close(self) -> None:
        self._channel.close()


class UpdateSubscription:
    """The subscriber's end: construct (it listens), tell the coordinator `address`, accept(), then
    recv() batches. One reader thread at a time."""

    def __init__(self, host: str) -> None:
        self._server = socket.create_server((host, 0))
        self.address = ChannelAddress(host, self._server.getsockname()[1], secrets.token_bytes(32))
        self._channel: _SharedConnection | None = None
        self._closed = False

    def connecting(self, timeout_s: float) -> bool:
        """True once a connection waits to be accepted (waits up to timeout_s)."""
        readable, _, _ = select.select([self._server], [], [], timeout_s)
        return bool(readable)

    def accept(self, timeout_s: float) -> None:
        """Waits for the coordinator to connect and prove it holds the key."""
        self._server.settimeout(timeout_s)
        try:
            sock, _ = self._server.accept()
        except TimeoutError as exc:
            raise ChannelClosed(f"no coordinator connected within {timeout_s}s") from exc
        finally:
            self._server.close()
        self._channel = _SharedConnection(*_authenticated(sock, self.address.authkey, timeout_s, accepting=True))
        if self._closed:  # closed while the handshake ran
            self._channel.close()

    def poll(self, timeout_s: float) -> bool:
        """True once a batch is ready to recv() (or the channel closed: recv() then raises)."""
        try:
            return self._connection().use(lambda conn: conn.poll(timeout_s))
        except (OSError, EOFError) as exc:
            raise ChannelClosed(f"the update channel closed: {exc}") from exc

    def recv(self) -> UpdateBatch:
        try:
            return self._connection().use(lambda conn: conn.recv())
        except (OSError, EOFError) as exc:
            raise ChannelClosed(f"the coordinator closed the update channel: {exc}") from exc

    def _connection(self) -> _SharedConnection:
        if self._channel is None:
            raise ChannelClosed("the update channel is not open")
        return self._channel

    def close(self) -> None:
        """Closes the channel from any thread; a thread blocked in poll() or recv() wakes with ChannelClosed."""
        self._closed = True
        self._server.close()
        if self._channel is not None:
            self._channel.close()


def _authenticated(
    sock: socket.socket, authkey: bytes, timeout_s: float, *, accepting: bool
) -> tuple[socket.socket, Connection]:
    """Wraps a connected socket in a Connection once both ends proved they hold authkey (HMAC challenge,
    each way, as multiprocessing's Listener and Client do). The handshake reads time out after timeout_s;
    later reads block."""
    sock.setblocking(True)  # the Connection reads the same file description: it must block
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout_s))
    conn = Connection(os.dup(sock.fileno()))
    try:
        if accepting:
            deliver_challenge(conn, authkey)
            answer_challenge(conn, authkey)
        else:
            answer_challenge(conn, authkey)
            deliver_challenge(conn, authkey)
    except (OSError, EOFError, AuthenticationError) as exc:
        _close(sock, conn)
        raise ChannelClosed(f"the update channel handshake failed: {type(exc).__name__}: {exc}") from exc
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(0))
    return sock, conn


def _close(sock: socket.socket, conn: Connection) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked on the other descriptor
    sock.close()
    conn.close()


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return int.to_bytes(whole, 8, "little", signed=True) + int.to_bytes(int((seconds - whole) * 1e6), 8, "little",
                                                                        signed=True)
