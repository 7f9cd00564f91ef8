"""Next-token sampling: greedy, or temperature with top-k / top-p, seeded per request.

Knows nothing of stop conditions; the scheduler decides when a sequence ends.
Shapes: B sequences, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW sample the argmax (dividing by them would overflow)."""
        return self.temperature < GREEDY_BELOW

    def make_generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return gen


def filter_logits(logits_V: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask out tokens outside the top-k and outside the smallest top-p nucleus."""
    if 0 < top_k < logits_V.shape[-1]:
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_V, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the first over p
        logits_V = logits_V.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
    return logits_V


def sample_next(
    logits_BV: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (token_ids_B, logprobs_B): the chosen ids and their log-probabilities under the model."""
    logits_BV = logits_BV.float().cpu()
    logprobs_BV = torch.log_softmax(logits_BV, dim=-1)
    chosen_B = torch.argmax(logits_BV, dim=-1)
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        shifted_V = logits_BV[row] - logits_BV[row].max()  # <= 0, so dividing cannot overflow to +inf
        filtered_V = filter_logits(shifted_V / p.temperature, p.top_k, p.top_p)
        probs_V = torch.softmax(filtered_V, dim=-1)
        chosen_B[row] = torch.multinomial(probs_V, 1, generator=gen)[0]
    return chosen_B, logprobs_BV.gather(1, chosen_B[:, None])[:, 0]
