"""The coordinator's update channel: authenticated both ways, batches arrive in order, a lost end is a
ChannelClosed on the other (never a hang); and the engine loop on top of it: updates made before anyone
subscribes reach the first subscriber, a lost subscriber aborts the requests in flight."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch

from cluster.engine import LLMEngine
from cluster.engine_loop import EngineLoop
from cluster.requests import GenerationRequest, SequenceUpdate
from cluster.torch_thread import TorchThread
from cluster.update_channel import ChannelClosed, UpdateBatch, UpdatePublisher, UpdateSubscription
from workers.runtime.local_build import build_attention_rank


def _connect(subscription: UpdateSubscription, address=None) -> tuple[UpdatePublisher | None, list[BaseException]]:
    """Connects a publisher from another thread while this one accepts; returns the publisher (None if it
    failed) and the errors of [publisher, accepting end]."""
    publisher: list[UpdatePublisher] = []
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            publisher.append(UpdatePublisher(address or subscription.address, timeout_s=5))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=connect)
    thread.start()
    try:
        subscription.accept(5)
    except BaseException as exc:
        thread.join(10)
        errors.append(exc)
    thread.join(10)
    return (publisher[0] if publisher else None), errors


def test_batches_arrive_in_order_with_their_updates():
    subscription = UpdateSubscription("127.0.0.1")
    publisher, errors = _connect(subscription)
    assert not errors
    try:
        for step in range(50):
            publisher.send(UpdateBatch([SequenceUpdate(f"r{step}", (step,), (-0.5,), None)], None))
        received = [subscription.recv() for _ in range(50)]
        assert [b.updates[0].token_ids for b in received] == [(s,) for s in range(50)]
        assert not subscription.poll(0.05)
    finally:
        publisher.close()
        subscription.close()


def test_a_publisher_with_the_wrong_key_is_refused_on_both_ends():
    subscription = UpdateSubscription("127.0.0.1")
    publisher, errors = _connect(subscription, replace(subscription.address, authkey=bytes(32)))
    assert publisher is None
    assert len(errors) == 2 and all(isinstance(e, ChannelClosed) for e in errors), errors
    assert all("handshake failed: AuthenticationError" in str(e) for e in errors), errors


def test_the_key_is_not_in_the_address_repr():
    subscription = UpdateSubscription("127.0.0.1")
    try:
        assert subscription.address.authkey.hex() not in repr(subscription.address)
        assert len(subscription.address.authkey) == 32
    finally:
        subscription.close()


def test_close_wakes_a_blocked_reader_and_fails_the_publisher():
    subscription = UpdateSubscription("127.0.0.1")
    publisher, _ = _connect(subscription)
    woke: list[BaseException] = []

    def read() -> None:
        try:
            subscription.recv()
        except ChannelClosed as exc:
            woke.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.1)
    subscription.close()
    reader.join(5)
    assert not reader.is_alive() and len(woke) == 1
    with pytest.raises(ChannelClosed, match="went away"):
        for _ in range(3):  # the first send after the peer closed may still be buffered
            publisher.send(UpdateBatch([], None))
    publisher.close()


def test_a_closed_publisher_ends_the_subscription():
    subscription = UpdateSubscription("127.0.0.1")
    publisher, _ = _connect(subscription)
    publisher.close()
    assert subscription.poll(5)
    with pytest.raises(ChannelClosed, match="closed the update channel"):
        subscription.recv()
    subscription.close()


def test_no_publisher_is_a_timeout_not_a_hang():
    subscription = UpdateSubscription("127.0.0.1")
    started = time.monotonic()
    with pytest.raises(ChannelClosed, match=r"within 0\.2s"):
        subscription.accept(0.2)
    assert time.monotonic() - started < 2


# the engine loop over the channel ---------------------------------------------------------------------


def _loop(model_dir) -> tuple[EngineLoop, TorchThread]:
    rank = build_attention_rank(model_dir, dtype=torch.float32, device=torch.device("cpu"), num_blocks=64,
                                block_size=8)
    loop = EngineLoop(LLMEngine(rank))
    thread = TorchThread()
    loop.start(thread)
    return loop, thread


def _request(rid: str, n: int) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=(5, 6, 7), max_new_tokens=n, ignore_eos=True)


def _subscribe(loop: EngineLoop) -> UpdateSubscription:
    subscription = UpdateSubscription("127.0.0.1")
    thread = threading.Thread(target=loop.subscribe, args=(subscription.address,))
    thread.start()
    subscription.accept(10)
    thread.join(10)
    return subscription


def _collect(subscription: UpdateSubscription, request_ids: set[str], timeout_s: float = 60) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {rid: [] for rid in request_ids}
    pending = set(request_ids)
    steps = 0
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        if not subscription.poll(1.0):
            continue
        batch = subscription.recv()
        steps += len(batch.stats.batch_sizes) if batch.stats else 0
        for update in batch.updates:
            tokens[update.request_id].extend(update.token_ids)
            if update.finish_reason:
                pending.discard(update.request_id)
    assert not pending, f"unfinished: {pending}"
    assert steps >= 1, "the batches carry the engine's per-step stats"
    return tokens


def test_updates_before_the_first_subscriber_are_delivered_to_it(tiny8):
    loop, thread = _loop(tiny8)
    try:
        loop.submit(_request("early", 4))
        time.sleep(0.5)  # the loop finishes it while no one listens
        subscription = _subscribe(loop)
        loop.submit(_request("late", 6))
        tokens = _collect(subscription, {"early", "late"})
        assert (len(tokens["early"]), len(tokens["late"])) == (4, 6)
        subscription.close()
    finally:
        loop.stop()
        thread.shutdown()


def test_a_lost_subscriber_aborts_the_requests_in_flight(tiny8):
    loop, thread = _loop(tiny8)
    try:
        subscription = _subscribe(loop)
        loop.submit(_request("long", 2000))
        assert subscription.poll(30), "generation did not start"
        subscription.close()
        deadline = time.monotonic() + 30
        while loop.engine.has_work() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not loop.engine.has_work() and not loop.engine.sequences
        assert loop.engine.rank.pool.usage == 0.0, "the aborted request's cache blocks are free again"
        second = _subscribe(loop)  # a new subscriber is served as before
        loop.submit(_request("next", 3))
        assert len(_collect(second, {"next"})["next"]) == 3
        second.close()
    finally:
        loop.stop()
        thread.shutdown()


def test_closing_from_two_threads_at_once_closes_each_descriptor_once():
    """The gateway's poller and a restart both close the subscription; a descriptor closed twice fails with
    EBADF, or closes whatever socket the process opened meanwhile (it broke a recovery in CI)."""
    errors: list[BaseException] = []
    for _ in range(200):
        subscription = UpdateSubscription("127.0.0.1")
        publisher, connect_errors = _connect(subscription)
        assert not connect_errors
        both = threading.Barrier(3)

        def close_recording_errors(subscription=subscription) -> None:
            try:
                subscription.close()
            except BaseException as exc:
                errors.append(exc)

        def close(both=both) -> None:
            both.wait()
            close_recording_errors()

        def read_then_close(both=both, subscription=subscription) -> None:  # as UpdateReceiver.drain does
            both.wait()
            try:
                subscription.poll(5)
                subscription.recv()
            except ChannelClosed:
                close_recording_errors()

        threads = [threading.Thread(target=close), threading.Thread(target=read_then_close)]
        for thread in threads:
            thread.start()
        both.wait()
        subscription.close()
        for thread in threads:
            thread.join(5)
        publisher.close()
    assert not errors, errors[:3]
