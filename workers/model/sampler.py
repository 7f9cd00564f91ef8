"""Next-token sampling: greedy, or temperature with top-k / top-p, batched on the logits' device.

A sampled token's randomness is a function of (the request's seed, the token's position) alone, so the same
request draws the same tokens in any batch and when replayed. Knows nothing of stop conditions; the
scheduler decides when a sequence ends.
Shapes: B sequences, S sampled (non-greedy) sequences, V vocab.
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



def draw_seed() -> int:
    """A seed for a request that gave none, drawn once at admission and kept with it."""
    return int(torch.randint(0, 2**62, ()).item())


def position_seed(seed: int, position: int) -> int:
    """The noise seed of the token at `position` of a request seeded `seed`: the draw depends on nothing
    else (not on the batch, nor on the draws before it), so a replay of the request draws the same tokens."""
    mixed = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    mixed ^= mixed >> 31
    return mixed & (2**63 - 1)


def filter_logits(logits_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Mask out (-inf) tokens outside each row's top-k (0 = no limit), then outside the smallest nucleus of
    top-p probability among those left. One sort of the batch, on its device."""
    vocab = logits_BV.shape[-1]
    sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
    k_B = torch.where(top_k_B > 0, top_k_B.clamp(max=vocab), vocab)  # [B]
    keep_BV = torch.arange(vocab, device=logits_BV.device)[None, :] < k_B[:, None]  # the top-k, in sorted order
    probs_BV = torch.softmax(sorted_BV.masked_fill(~keep_BV, float("-inf")), dim=-1)
    keep_BV &= probs_BV.cumsum(-1) - probs_BV < top_p_B[:, None]  # keep the first token that passes p
    keep_BV = torch.zeros_like(keep_BV).scatter(1, order_BV, keep_BV)  # back to vocabulary order
    return logits_BV.masked_fill(~keep_BV, float("-inf"))


def sample_next(
    logits_BV: torch.Tensor, params: list[SamplingParams], seeds: list[int | None], positions: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (token_ids_B, logprobs_B) on the logits' device: the chosen ids and their log-probabilities
    under the model. Greedy rows take the argmax; the others sample with temperature, top-k and top-p by an
    exponential race (argmax of probs / Exp(1) noise) whose noise is seeded by (seed, position)."""
    logits_BV = logits_BV.float()
    chosen_B = torch.argmax(logits_BV, dim=-1)
    rows = [row for row, p in enumerate(params) if not p.greedy]
    if rows:
        device = logits_BV.device
        index_S = torch.tensor(rows, device=device)
        sampled_SV = logits_BV[index_S]
        temperature_S = torch.tensor([params[r].temperature for r in rows], device=device)
        shifted_SV = (sampled_SV - sampled_SV.max(-1, keepdim=True).values) / temperature_S[:, None]  # <= 0
        if any(params[r].top_k or params[r].top_p < 1.0 for r in rows):
            top_k_S = torch.tensor([params[r].top_k for r in rows], device=device)
            top_p_S = torch.tensor([params[r].top_p for r in rows], device=device)
            shifted_SV = filter_logits(shifted_SV, top_k_S, top_p_S)
        probs_SV = torch.softmax(shifted_SV, dim=-1)
        noise_SV = torch.stack([_exponential_noise(logits_BV.shape[-1], seeds[r], positions[r], device) for r in rows])
        chosen_B[index_S] = torch.argmax(probs_SV / noise_SV, dim=-1)
    logprobs_B = logits_BV.gather(1, chosen_B[:, None])[:, 0] - torch.logsumexp(logits_BV, dim=-1)
    return chosen_B, logprobs_B


def _exponential_noise(vocab: int, seed: int | None, position: int, device: torch.device) -> torch.Tensor:
    assert seed is not None, "a sampled (non-greedy) request needs a seed: draw_seed() at admission"
    generator = torch.Generator(device=device)
    generator.manual_seed(position_seed(seed, position))
    return torch.empty(vocab, device=device).exponential_(generator=generator).clamp_(min=1e-30)  # [V], never 0
