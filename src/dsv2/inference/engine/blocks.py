"""The block pool: which cache blocks are in use by whom, and which hold a known prefix (the prefix cache).

A block is `block_size` cache slots. A sequence's blocks are its block table; blocks shared between sequences (a
common prompt prefix, the n completions of one prompt) are reference-counted. A block whose count drops to zero
goes to the end of the free list, and a full block keeps its content hash: until it is allocated again (the free
list is taken from the front: least recently freed first), a later request whose prompt starts with the same
tokens can take it back instead of computing it again. The hash of a full block is that of (its parent block's
hash, its token ids), so a hit on block i implies the whole prefix up to it matches.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

ROOT_HASH = b""
"""The parent hash of a sequence's first block."""


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: 128 bits of blake2b over the parent's key and the block's tokens (a
    collision would serve wrong cache rows, so not Python's 64-bit hash)."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


class NoFreeBlocks(RuntimeError):
    """Raised by allocate() when every block is in use (the scheduler checks can_allocate first)."""


class BlockPool:
    def __init__(self, num_blocks: int, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # least recently freed first
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self.queries = 0
        """Prompt blocks looked up in the prefix cache."""
        self.hits = 0
        """Of those, found."""

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self) -> int:
        """A block for new content, reference count 1 (a cached block is evicted from the prefix cache)."""
        if not self._free:
            raise NoFreeBlocks("every cache block is in use")
        block, _ = self._free.popitem(last=False)
        h = self._hash_of.pop(block, None)
        if h is not None:
            del self._by_hash[h]
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more holder of a block in use (a forked completion)."""
        assert self.refs[block] > 0, "share() of a free block"
        self.refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """One holder fewer of each block; a block nobody holds becomes free (keeping its hash, if cached)."""
        for block in blocks:
            assert self.refs[block] > 0, f"block {block} released more often than held"
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self._free[block] = None

    def cache(self, block: int, h: bytes) -> None:
        """Record that a full block holds the prefix with key h (a block already holding it is kept)."""
        if self.prefix_caching and h not in self._by_hash and block not in self._hash_of:
            self._by_hash[h] = block
            self._hash_of[block] = h

    def lookup(self, h: bytes) -> int | None:
        """The block holding prefix key h, now held once more by the caller; None if not cached."""
        self.queries += 1
        block = self._by_hash.get(h) if self.prefix_caching else None
        if block is None:
            return None
        self.hits += 1
        if self.refs[block] == 0:
            del self._free[block]
        self.refs[block] += 1
        return block

    def check(self) -> None:
        """The invariants (tests): free blocks are exactly those nobody holds; the hash maps mirror each other."""
        assert all(r >= 0 for r in self.refs)
        assert set(self._free) == {b for b, r in enumerate(self.refs) if r == 0}
        assert {b: h for h, b in self._by_hash.items()} == self._hash_of
