"""Automatic prefix caching: the bookkeeping of the KV pool's blocks (reference counts, a hash → block map and
a free queue in eviction order) and the hash chain that names a full block.

A full block is named by hash(its parent block's name, its token ids). Equal names mean equal token ids at equal
positions from position 0 on, and that is everything a block's K/V depend on here: the model's weights are fixed
for the pool's lifetime, positions follow from the chain, and requests carry nothing else that enters attention
(no adapters, no multimodal inputs, no per-request cache salt; one added later must be hashed into the chain).
Blocks are shared read-only by reference count: only full blocks get a name, and a sequence writes only past
its last full block. A block whose last user left stays findable in the free queue until its turn to be
evicted: blocks holding no name go first, then named ones least-recently released first.

Knows nothing of tensors or of sequences: block ids, reference counts and names only.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

BlockHash = bytes
_ROOT = bytes(16)  # the parent of a sequence's first block


def hash_block(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """The name of a full block: 128-bit BLAKE2b of its parent's name (None for a sequence's first block) and its
    token ids (as int64). Collisions are as unlikely as a random 128-bit match."""
    digest = hashlib.blake2b(parent if parent is not None else _ROOT, digest_size=16)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockAllocator:
    """Reference counts and names of `num_blocks` blocks; blocks with no reference wait in the free queue."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self._name_of: list[BlockHash | None] = [None] * num_blocks
        self._block_named: dict[BlockHash, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # next to evict first
        self.num_evicted = 0  # named blocks reused for other contents so far

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds (named or not): what allocate() can hand out."""
        return len(self._free)

    @property
    def num_named(self) -> int:
        return len(self._block_named)

    def free_order(self) -> list[int]:
        """The free queue, next to be allocated first."""
        return list(self._free)

    def lookup(self, name: BlockHash) -> int | None:
        return self._block_named.get(name)

    def name_of(self, block: int) -> BlockHash | None:
        return self._name_of[block]

    def allocate(self, count: int) -> list[int]:
        """`count` blocks from the front of the free queue, each with one reference; a named one loses its name."""
        assert count <= len(self._free), f"allocate({count}) with {len(self._free)} free blocks: check num_free first"
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            if (name := self._name_of[block]) is not None:
                self._name_of[block] = None
                del self._block_named[name]
                self.num_evicted += 1
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def share(self, block: int) -> None:
        """One more reference to a named block (out of the free queue if it was there)."""
        assert self._name_of[block] is not None, f"block {block} is shared but holds no name"
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """Drops one reference to each block, in order. A block left with none joins the free queue: at its back
        when named (evicted after every block released before it), at its front when not (it caches nothing)."""
        for block in blocks:
            assert self.ref_counts[block] > 0, f"block {block} released more often than it was held"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None
                if self._name_of[block] is None:
                    self._free.move_to_end(block, last=False)

    def name(self, block: int, name: BlockHash) -> bool:
        """Makes a full, written, held block findable as `name`; False (the block stays private) when another block
        has that name already (two sequences computed the same block at once)."""
        assert self.ref_counts[block] > 0 and self._name_of[block] is None, f"block {block} cannot take a name"
        if name in self._block_named:
            return False
        self._block_named[name] = block
        self._name_of[block] = name
        return True

    def forget_names(self) -> None:
        """Every block loses its name (the cache empties; references are untouched)."""
        self._block_named.clear()
        self._name_of = [None] * self.num_blocks
