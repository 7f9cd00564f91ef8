"""Drivers that compare mixserve against transformers.MixtralForCausalLM (the numerical oracle)."""

from __future__ import annotations

from pathlib import Path

import torch

from cluster.bench.gpu import relative_error as relative_error  # the one definition; tests import it from here
from workers.model.attention import SequenceChunk
from workers.model.kv_cache import SequenceBlocks
from workers.runtime.attention_rank import AttentionRank
from workers.runtime.timing import StepTimings


def load_hf(model_dir: Path):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def random_prompts_and_greedy(
    model_dir: Path, *, seed: int, lengths: tuple[int, ...], steps: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Random prompts of `lengths` (ids 3..255, seeded) and transformers' greedy `steps` tokens after each."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in lengths]
    hf = load_hf(model_dir)
    return prompts, [hf_greedy(hf, p, steps)[0] for p in prompts]


@torch.no_grad()
def hf_greedy(hf, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation by transformers without early stop, and its logits at every position."""
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    logits = hf(torch.tensor([ids])).logits[0]  # [P + steps, V]
    return ids[len(prompt):], logits[: len(ids) - 1]


@torch.no_grad()
def teacher_forced_logits(rank: AttentionRank, sequences: list[list[int]], prompt_lens: list[int],
                          prefill_chunk: int | None = None, join_steps: list[int] | None = None) -> list[torch.Tensor]:
    """Runs a batch through prefill (optionally chunked) then one-token decode steps together,
    feeding the given token sequences; returns each sequence's logits at positions [0, len-1).
    join_steps[i]: the step at which sequence i arrives (default 0: all at once)."""
    blocks = [SequenceBlocks() for _ in sequences]
    outs: list[list[torch.Tensor]] = [[] for _ in sequences]
    cursor = [0] * len(sequences)
    joins = join_steps or [0] * len(sequences)
    step = 0
    while any(c < len(s) - 1 for c, s in zip(cursor, sequences, strict=True)):
        chunks, ids, owners = [], [], []
        for i, seq in enumerate(sequences):
            end = len(seq) - 1
            if cursor[i] >= end or joins[i] > step:
                continue
            n = prompt_lens[i] - cursor[i] if cursor[i] < prompt_lens[i] else 1
            n = min(n, prefill_chunk or n, end - cursor[i])
            rank.pool.reserve(blocks[i], n)
            chunks.append(SequenceChunk(blocks[i], cursor[i], n))
            ids.extend(seq[cursor[i] : cursor[i] + n])
            owners.append((i, n))
            cursor[i] += n
        step += 1
        if not chunks:
            continue
        h = rank.forward(torch.tensor(ids), chunks, StepTimings())
        logits = rank.logits(h)
        start = 0
        for i, n in owners:
            outs[i].append(logits[start : start + n])
            start += n
    for b in blocks:
        rank.pool.release(b)
    return [torch.cat(o) for o in outs]
