"""A preallocated pool of fixed-size KV blocks and per-sequence block tables.

A sequence of a sliding-window model keeps only ceil(window / block_size) blocks and addresses
them as a ring, so it never holds more than its window. The pool knows nothing of scheduling:
callers decide who gets blocks.
Shapes: L layers, B blocks in the pool, S block size (tokens), Hkv kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class CacheFull(RuntimeError):
    """The pool has fewer free blocks than a sequence needs."""


@dataclass(frozen=True, kw_only=True)
class KVCacheSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    dtype: torch.dtype
    device: torch.device

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def bytes_per_block(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def max_blocks_per_sequence(self, num_tokens: int) -> int:
        """Blocks a sequence of num_tokens tokens holds (capped by the window's ring)."""
        needed = -(-num_tokens // self.block_size)
        return min(needed, self.ring_blocks) if self.sliding_window else needed

    @property
    def ring_blocks(self) -> int:
        assert self.sliding_window, "only sliding-window models use a ring"
        return -(-self.sliding_window // self.block_size)


@dataclass
class SequenceBlocks:
    """The blocks of one sequence; `num_cached` tokens have their K/V written."""

    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0


class KVCachePool:
    def __init__(self, spec: KVCacheSpec) -> None:
        self.spec = spec
        shape = (spec.num_layers, spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k_LBSHd = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self.v_LBSHd = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self._free = list(range(spec.num_blocks - 1, -1, -1))

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.spec.num_blocks

    def blocks_needed(self, seq: SequenceBlocks, new_tokens: int) -> int:
        return self.spec.max_blocks_per_sequence(seq.num_cached + new_tokens) - len(seq.blocks)

    def reserve(self, seq: SequenceBlocks, new_tokens: int) -> None:
        """Make room for new_tokens more tokens of seq, or raise CacheFull and change nothing."""
        needed = self.blocks_needed(seq, new_tokens)
        if needed > len(self._free):
            raise CacheFull(f"need {needed} KV blocks, {len(self._free)} free")
        for _ in range(max(needed, 0)):
            seq.blocks.append(self._free.pop())

    def release(self, seq: SequenceBlocks) -> None:
        self._free.extend(reversed(seq.blocks))
        seq.blocks.clear()
        seq.num_cached = 0
