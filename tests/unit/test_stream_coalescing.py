"""A stream that falls behind the engine gets one chunk for the updates waiting in its queue, and a stop
string inside such a chunk still ends it at the token that completed the stop (the shipped tokenizer)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cluster.gateway.generation_run import _coalesce, _push_until_stop
from cluster.gateway.text_stream import TextStream
from cluster.requests import SequenceUpdate
from cluster.tokenizer import TextTokenizer

MODEL = Path(__file__).resolve().parents[2] / "models" / "mixserve-tiny"


def _queue(*updates: SequenceUpdate) -> asyncio.Queue[SequenceUpdate]:
    queue: asyncio.Queue[SequenceUpdate] = asyncio.Queue()
    for update in updates:
        queue.put_nowait(update)
    return queue


def test_waiting_updates_join_into_one_and_stop_at_the_finished_one():
    first = SequenceUpdate("r", (5,), (-0.1,), queue_seconds=0.25)
    queue = _queue(SequenceUpdate("r", (6,), (-0.2,)), SequenceUpdate("r", (7,), (-0.3,), "length"),
                   SequenceUpdate("r", (), (), "abort"))
    joined = _coalesce(first, queue)
    assert joined == SequenceUpdate("r", (5, 6, 7), (-0.1, -0.2, -0.3), "length", None, 0.25)
    assert queue.qsize() == 1, "nothing after the finishing update is taken"


def test_a_lone_update_is_passed_through():
    first = SequenceUpdate("r", (5,), (-0.1,))
    assert _coalesce(first, _queue()) is first


def test_an_error_behind_tokens_keeps_its_error():
    joined = _coalesce(SequenceUpdate("r", (5,), (-0.1,)), _queue(SequenceUpdate("r", (), (), "error", "lost")))
    assert (joined.finish_reason, joined.error, joined.token_ids) == ("error", "lost", (5,))


def test_a_stop_string_inside_a_joined_chunk_cuts_its_tokens():
    tokenizer = TextTokenizer.from_model_dir(MODEL, None)
    ids = tuple(tokenizer.encode("the cat sat on the mat and then the dog ran off"))
    texts = [tokenizer.tokenizer.decode(list(ids[: i + 1])) for i in range(len(ids))]
    stop_at = next(i for i in range(3, len(ids)) if len(texts[i]) > len(texts[i - 1]) + 1)
    stop = texts[stop_at][len(texts[stop_at - 1]):]  # appears first in the text of token stop_at
    assert stop not in texts[stop_at - 1], "test setup: the stop string must first appear at token stop_at"
    kept, delta, stopped = _push_until_stop(TextStream(tokenizer, [], (stop,)), ids)
    assert stopped and kept == ids[: stop_at + 1]
    assert delta == texts[stop_at][: texts[stop_at].index(stop)]
    unstopped, all_text, never = _push_until_stop(TextStream(tokenizer, [], ("zzzz-not-there",)), ids)
    assert (unstopped, never) == (ids, False)
    assert texts[-1].startswith(all_text), "text held back for a possible stop comes with finish()"
