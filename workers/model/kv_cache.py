"""A preallocated pool of fixed-size KV blocks and per-sequence block tables, with automatic prefix caching.

Without prefix caching, a sequence of a sliding-window model keeps only ceil(window / block_size) blocks and
addresses them as a ring, so it never holds more than its window.

With prefix caching (`set_prefix_caching`; workers.model.prefix_cache keeps the books), full blocks are named by
a hash chain over their tokens once written (`commit`), shared read-only by reference count, and kept after their
last user leaves until evicted least-recently-used; a new sequence starts from the longest usable run of cached
blocks (`find_prefix`, then `reserve`). Sliding-window models are supported: their tables are linear (logical
block i at entry i, like full attention) and the blocks every later query's window has passed are released
(still cached) and left in the table as NULL_BLOCK; a prefix is usable when the blocks of the window before its
end are cached, whatever became of the blocks before (vLLM's sliding-window manager works the same way). A
windowed sequence then holds at most ceil((window - 1) / block_size) + 1 blocks between steps, one more than
its ring, and during a step also the blocks of its new tokens.

The pool knows nothing of scheduling or of token ids: callers decide who gets blocks and pass the block names.
Shapes: L layers, B blocks in the pool, S block size (tokens), Hkv kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.model.prefix_cache import BlockAllocator, BlockHash

UNLIMITED = 2**62  # max_new_tokens of a ring
NULL_BLOCK = 0  # a table entry the sequence no longer holds (never read: outside every later query's window)


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
    """The block table of one sequence (entry i: the pool block of its logical block i, or of ring slot i); its
    first `num_cached` tokens have their K/V written. The first `num_dropped` entries are NULL_BLOCK (slid out of
    a window, or never needed: a cached prefix of a windowed model); the first `num_committed` blocks were
    offered to the prefix cache."""

    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    num_dropped: int = 0
    num_committed: int = 0


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks a new sequence can start from: its logical blocks [first, first + len(blocks)); the blocks
    before `first` are not needed (before the window of its first new token)."""

    first: int = 0
    blocks: tuple[int, ...] = ()

    @property
    def num_blocks(self) -> int:
        return self.first + len(self.blocks) if self.blocks else 0


class KVCachePool:
    def __init__(self, spec: KVCacheSpec) -> None:
        self.spec = spec
        shape = (spec.num_layers, spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k_LBSHd = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self.v_LBSHd = torch.zeros(shape, dtype=spec.dtype, device=spec.device)
        self.allocator = BlockAllocator(spec.num_blocks)
        self.prefix_caching = False

    def set_prefix_caching(self, enabled: bool) -> None:
        """Turns prefix caching on or off; only while no sequence holds a block (it changes how windowed
        sequences lay out their tables). Turning it off forgets every cached block."""
        if self.allocator.num_free != self.spec.num_blocks:
            held = self.spec.num_blocks - self.allocator.num_free
            raise RuntimeError(f"set_prefix_caching({enabled}) while sequences hold {held} KV blocks")
        if not enabled:
            self.allocator.forget_names()
        self.prefix_caching = enabled

    @property
    def _ring(self) -> bool:
        return self.spec.sliding_window is not None and not self.prefix_caching

    @property
    def usage(self) -> float:
        """The fraction of blocks some sequence holds (cached blocks nobody holds count as free)."""
        return 1.0 - self.allocator.num_free / self.spec.num_blocks

    def _table_length(self, num_tokens: int) -> int:
        """Entries of the table of a sequence of num_tokens tokens."""
        if self._ring:
            return self.spec.max_blocks_per_sequence(num_tokens)
        return -(-num_tokens // self.spec.block_size)

    def max_blocks_held(self, num_tokens: int) -> int:
        """The most blocks a sequence of up to num_tokens tokens holds between steps (a step's new tokens may
        take more: see max_new_tokens)."""
        spec = self.spec
        if spec.sliding_window is None or self._ring:
            return spec.max_blocks_per_sequence(num_tokens)
        return min(-(-num_tokens // spec.block_size), -(-(spec.sliding_window - 1) // spec.block_size) + 1)

    def max_new_tokens(self, seq: SequenceBlocks, prefix: PrefixHit | None = None) -> int:
        """The most new tokens seq could reserve in one step if it held every block of the pool (starting from
        prefix when given): a windowed sequence's linear table must hold the blocks of all its new tokens."""
        if self._ring:
            return UNLIMITED  # a ring takes a chunk of any length (it keeps the chunk's last window)
        if prefix is not None and prefix.blocks:
            first, cached = prefix.first, prefix.num_blocks * self.spec.block_size
        else:
            first, cached = seq.num_dropped, seq.num_cached
        return (first + self.spec.num_blocks) * self.spec.block_size - cached

    def blocks_needed(self, seq: SequenceBlocks, new_tokens: int) -> int:
        return self._table_length(seq.num_cached + new_tokens) - len(seq.blocks)

    def find_prefix(self, hashes: list[BlockHash]) -> PrefixHit:
        """The longest usable run of cached blocks for a new sequence whose full blocks are named `hashes` (the
        caller leaves out the block of the sequence's last token: a step must compute at least one token).
        Full attention needs every block from the first; a window needs only the blocks of the window before
        the run's end. Takes no reference: pass the hit to reserve() at once."""
        if not self.prefix_caching or not hashes:
            return PrefixHit()
        lookup = self.allocator.lookup
        window = self.spec.sliding_window
        if window is None:
            blocks = []
            for name in hashes:
                if (block := lookup(name)) is None:
                    break
                blocks.append(block)
            return PrefixHit(0, tuple(blocks))
        needed = max(1, -(-(window - 1) // self.spec.block_size))  # blocks with the first new token's keys
        run = 0
        for index in range(len(hashes) - 1, -1, -1):  # from the longest prefix down: the first window that hits
            run = run + 1 if lookup(hashes[index]) is not None else 0
            if run >= needed:
                return PrefixHit(index, tuple(lookup(h) for h in hashes[index : index + needed]))
        return PrefixHit(0, tuple(lookup(h) for h in hashes[:run]))  # a run from block 0 needs no window before it

    def reserve(self, seq: SequenceBlocks, new_tokens: int, prefix: PrefixHit | None = None) -> None:
        """Make room for new_tokens more tokens of seq, or raise CacheFull and change nothing. prefix (from
        find_prefix, for a sequence holding no blocks): start from those cached blocks, new_tokens after them."""
        allocator = self.allocator
        if prefix is not None and prefix.blocks:
            assert not seq.blocks and seq.num_cached == 0, "a prefix hit is for a sequence holding no blocks"
            cached, table, revived = prefix.num_blocks * self.spec.block_size, prefix.num_blocks, sum(
                allocator.ref_counts[b] == 0 for b in prefix.blocks)
        else:
            cached, table, revived = seq.num_cached, len(seq.blocks), 0
        needed = max(self._table_length(cached + new_tokens) - table, 0)
        if needed + revived > allocator.num_free:
            raise CacheFull(f"need {needed + revived} KV blocks, {allocator.num_free} free")
        if prefix is not None and prefix.blocks:
            for block in prefix.blocks:
                allocator.share(block)
            seq.blocks = [NULL_BLOCK] * prefix.first + list(prefix.blocks)
            seq.num_cached = cached
            seq.num_dropped, seq.num_committed = prefix.first, prefix.num_blocks
        seq.blocks.extend(allocator.allocate(needed))

    def commit(self, seq: SequenceBlocks, hashes: list[BlockHash]) -> None:
        """After a step wrote seq's K/V up to num_cached: names its newly full blocks `hashes[i]` (the names of
        the sequence's full blocks, at least num_cached // block_size of them), making them shareable, and
        releases (still cached) the blocks that every later query's window has passed."""
        if not self.prefix_caching:
            return
        size, window = self.spec.block_size, self.spec.sliding_window
        full = seq.num_cached // size
        assert len(hashes) >= full, f"{len(hashes)} block names for {full} full blocks"
        for index in range(seq.num_committed, full):
            self.allocator.name(seq.blocks[index], hashes[index])
        seq.num_committed = max(seq.num_committed, full)
        if window is not None:
            passed = max(0, seq.num_cached - window + 1) // size  # blocks before the next query's first key
            if passed > seq.num_dropped:
                self.allocator.release(seq.blocks[seq.num_dropped : passed])
                seq.blocks[seq.num_dropped : passed] = [NULL_BLOCK] * (passed - seq.num_dropped)
                seq.num_dropped = passed

    def release(self, seq: SequenceBlocks) -> None:
        """Frees seq's blocks (cached ones stay findable). Full attention releases the last block first, so a
        prefix's tail is evicted before its head; a window needs the end of a prefix, so its head goes first."""
        held = seq.blocks[seq.num_dropped :]
        self.allocator.release(held if self.spec.sliding_window is not None else reversed(held))
        seq.blocks.clear()
        seq.num_cached = seq.num_dropped = seq.num_committed = 0
