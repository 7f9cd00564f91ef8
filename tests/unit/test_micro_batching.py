"""Ping-pong's split of a step into micro-batches: consecutive runs of whole chunks, about equal in tokens,
never more than asked, none below the minimum; and the step header that tells the expert ranks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.model.attention import SequenceChunk
from workers.model.kv_cache import SequenceBlocks
from workers.runtime.attention_rank import MicroBatching
from workers.runtime.step_header import MAX_MICRO_BATCHES, Command, StepHeader


def _chunks(sizes: list[int]) -> list[SequenceChunk]:
    return [SequenceChunk(SequenceBlocks(), 0, n) for n in sizes]


def _tokens(run: list[SequenceChunk]) -> int:
    return sum(c.num_new for c in run)


def test_a_decode_step_of_many_sequences_splits_in_halves():
    runs = MicroBatching(micro_batches=2, min_tokens=8).split(_chunks([1] * 32))
    assert [_tokens(r) for r in runs] == [16, 16]


def test_a_step_below_twice_the_minimum_stays_one_batch():
    assert len(MicroBatching(micro_batches=2, min_tokens=256).split(_chunks([1] * 32 + [400]))) == 1
    assert len(MicroBatching(micro_batches=2, min_tokens=256).split(_chunks([100] * 5 + [12]))) == 2


def test_one_long_chunk_cannot_be_split():
    assert len(MicroBatching(micro_batches=2, min_tokens=1).split(_chunks([1024]))) == 1


def test_one_micro_batch_is_the_whole_step():
    chunks = _chunks([5, 300, 7, 900])
    assert MicroBatching(micro_batches=1, min_tokens=1).split(chunks) == [chunks]


@given(st.lists(st.integers(1, 600), min_size=1, max_size=40), st.integers(1, MAX_MICRO_BATCHES),
       st.integers(1, 512))
def test_runs_are_consecutive_whole_chunks_within_the_limits(sizes, micro_batches, min_tokens):
    chunks = _chunks(sizes)
    runs = MicroBatching(micro_batches=micro_batches, min_tokens=min_tokens).split(chunks)
    assert [c for run in runs for c in run] == chunks  # every chunk once, in order
    assert all(runs)
    total = sum(sizes)
    parts = max(1, min(micro_batches, total // min_tokens, len(chunks)))
    assert len(runs) <= parts
    done = [sum(_tokens(r) for r in runs[: i + 1]) for i in range(len(runs) - 1)]
    assert all(d >= total * (i + 1) / parts for i, d in enumerate(done))  # no run ends before its share


@pytest.mark.parametrize("bad", [dict(micro_batches=0), dict(micro_batches=MAX_MICRO_BATCHES + 1), dict(min_tokens=0)])
def test_settings_out_of_range_are_refused(bad):
    with pytest.raises(ValueError):
        MicroBatching(**bad)


def test_a_step_header_needs_a_capacity_per_micro_batch_and_at_most_the_maximum():
    with pytest.raises(ValueError, match="at least one"):
        StepHeader(command=Command.STEP, num_tokens=4)
    with pytest.raises(ValueError, match="at most"):
        StepHeader(command=Command.STEP, num_tokens=4, capacities=(8,) * (MAX_MICRO_BATCHES + 1))
    with pytest.raises(ValueError, match=">= 0"):
        StepHeader(command=Command.STEP, num_tokens=4, capacities=(8, -1))
    assert StepHeader(command=Command.KEEPALIVE).capacities == ()
