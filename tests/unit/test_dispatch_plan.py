"""`counts_if_grouped`: rows from one source rank arrive grouped by local expert, so the expert rank can
skip the regrouping gather; rows from several sources, or for an expert the rank lacks, cannot."""

from __future__ import annotations

import pytest
import torch

from workers.comm import DispatchError, DispatchPlan, counts_if_grouped


def _plan(recv_counts_RE: list[list[int]]) -> DispatchPlan:
    counts = torch.tensor(recv_counts_RE, dtype=torch.int64)
    return DispatchPlan(permutation_N=torch.empty(0, dtype=torch.int64), send_counts_RE=torch.zeros_like(counts),
                        recv_counts_RE=counts, input_splits=(0,) * counts.shape[0],
                        output_splits=tuple(counts.sum(1).tolist()))


def test_rows_from_one_source_are_counted_per_local_expert():
    assert counts_if_grouped(_plan([[3, 0, 5], [0, 0, 0]]), num_local_experts=3) == [3, 0, 5]
    assert counts_if_grouped(_plan([[0, 0], [0, 0], [1, 2]]), num_local_experts=2) == [1, 2]


def test_no_rows_is_zero_rows_for_every_local_expert():
    assert counts_if_grouped(_plan([[0, 0], [0, 0]]), num_local_experts=2) == [0, 0]


def test_rows_from_two_sources_are_not_grouped():
    assert counts_if_grouped(_plan([[1, 0], [0, 1]]), num_local_experts=2) is None


def test_rows_for_an_expert_this_rank_lacks_are_an_error():
    # e_max is 3 across ranks; this rank holds 2 experts
    with pytest.raises(DispatchError, match=r"local experts \[2\].*holds 2"):
        counts_if_grouped(_plan([[1, 0, 4], [0, 0, 0]]), num_local_experts=2)
