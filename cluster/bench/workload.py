"""The benchmark workload: seeded random prompts of one length, every request producing exactly
`output_len` tokens (greedy, end-of-sequence ignored). Knows nothing of engines or transports."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.requests import GenerationRequest
from workers.model.sampler import SamplingParams

RESERVED_IDS = 3  # <unk>, <s>, </s> in Mixtral vocabularies: never used as prompt tokens


@dataclass(frozen=True, kw_only=True)
class Workload:
    num_prompts: int
    input_len: int
    output_len: int
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def output_tokens(self) -> int:
        return self.num_prompts * self.output_len

    @property
    def forwarded_tokens(self) -> int:
        """Tokens that go through the layer stack: every prompt token, then every sampled token but the last."""
        return self.num_prompts * (self.input_len + self.output_len - 1)


def make_prompts(workload: Workload, vocab_size: int) -> list[tuple[int, ...]]:
    if vocab_size <= RESERVED_IDS:
        raise ValueError(f"vocab_size ({vocab_size}) leaves no ids above the {RESERVED_IDS} reserved ones")
    gen = torch.Generator().manual_seed(workload.seed)
    ids_NP = torch.randint(RESERVED_IDS, vocab_size, (workload.num_prompts, workload.input_len), generator=gen)
    return [tuple(row) for row in ids_NP.tolist()]


def engine_requests(prompts: list[tuple[int, ...]], output_len: int, tag: str) -> list[GenerationRequest]:
    """Greedy requests that ignore end-of-sequence, so each produces exactly output_len tokens."""
    greedy = SamplingParams(temperature=0.0)
    return [
        GenerationRequest(request_id=f"{tag}-{i}", prompt_token_ids=p, sampling=greedy, max_new_tokens=output_len,
                          ignore_eos=True)
        for i, p in enumerate(prompts)
    ]
