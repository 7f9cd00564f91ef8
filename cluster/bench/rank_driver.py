"""Drives an `AttentionRank` directly (no scheduler, no engine): one prefill of a batch of sequences, then
one-token decode steps for all of them together. Used by the GPU check's parity and decode benchmark.

Imports torch and workers only, so it runs where Ray and gRPC are not installed.
Shapes: B sequences, T tokens in a step, D model dim, V vocab.
"""

from __future__ import annotations

import torch

from workers.model.attention import SequenceChunk
from workers.model.kv_cache import SequenceBlocks
from workers.runtime.attention_rank import AttentionRank
from workers.runtime.timing import StepTimings


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RankDriver:
    def __init__(self, rank: AttentionRank) -> None:
        self.rank = rank
        self.blocks: list[SequenceBlocks] = []
        self.lengths: list[int] = []  # tokens cached per sequence
        self.timings = StepTimings()

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Caches every prompt in one step; returns the final hidden state of each prompt's last token [B, D]."""
        assert not self.blocks, "prefill once per driver; release() first"
        h_TD = self.prefill_all_positions(prompts)
        last_B = torch.tensor(self.lengths).cumsum(0) - 1
        return h_TD[last_B.to(h_TD.device)]

    def prefill_all_positions(self, sequences: list[list[int]]) -> torch.Tensor:
        """Like prefill, but returns every position's final hidden state [T, D] (teacher forcing)."""
        self.blocks = [SequenceBlocks() for _ in sequences]
        chunks = []
        for blocks, seq in zip(self.blocks, sequences, strict=True):
            self.rank.pool.reserve(blocks, len(seq))
            chunks.append(SequenceChunk(blocks, 0, len(seq)))
        ids_T = torch.tensor([t for s in sequences for t in s], dtype=torch.int64)
        self.lengths = [len(s) for s in sequences]
        return self.rank.forward(ids_T, chunks, self.timings)

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feeds one new token per sequence; returns their final hidden states [B, D]."""
        assert len(tokens) == len(self.blocks), f"{len(tokens)} tokens for {len(self.blocks)} sequences"
        chunks = []
        for blocks, cached in zip(self.blocks, self.lengths, strict=True):
            self.rank.pool.reserve(blocks, 1)
            chunks.append(SequenceChunk(blocks, cached, 1))
        h_BD = self.rank.forward(torch.tensor(tokens, dtype=torch.int64), chunks, self.timings)
        self.lengths = [n + 1 for n in self.lengths]
        return h_BD

    def greedy(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuation of every prompt, new_tokens each."""
        out: list[list[int]] = [[] for _ in prompts]
        h_BD = self.prefill(prompts)
        for step in range(new_tokens):
            next_B = self.rank.logits(h_BD).argmax(dim=-1).tolist()
            for seq, token in zip(out, next_B, strict=True):
                seq.append(token)
            if step + 1 < new_tokens:
                h_BD = self.decode(next_B)
        return out

    def release(self) -> None:
        for blocks in self.blocks:
            self.rank.pool.release(blocks)
        self.blocks, self.lengths = [], []
