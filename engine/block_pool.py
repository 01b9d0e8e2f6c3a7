"""Ref-counted allocator of KV cache blocks, with a cache of full blocks by content hash.

Pure Python: no torch, testable alone. Every block is in exactly one of three states: owned (ref
count >= 1, one per sequence using it), cached (ref count 0, holds the KV of a known token prefix,
evictable LRU) or free. Owners give blocks back with :meth:`BlockPool.free`, in sequence order;
:meth:`BlockPool.check_integrity` verifies these invariants.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from core.errors import BlockPoolCorruptedError, OutOfBlocksError


class BlockPool:
    """Hands out block ids in ``[0, num_blocks)``; all-or-nothing allocation.

    A full block registered with a hash (:meth:`register`) stays findable by :meth:`lookup`
    while owned or cached; :meth:`share` adds an owner (reviving a cached block);
    :meth:`allocate` takes free blocks first, then evicts the least recently used cached ones.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self._num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref 0 and hashed, LRU first
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: free ones plus evictable cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def num_used(self) -> int:
        return self._num_blocks - self.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by someone, in [0, 1]."""
        return self.num_used / self._num_blocks

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks, each with ref count 1 and no hash; evicts LRU cached blocks when
        the free list runs short. Raises :class:`OutOfBlocksError` (and takes nothing)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.num_free:
            raise OutOfBlocksError(f"need {n} KV blocks, {self.num_free} free")
        ids = []
        for _ in range(n):
            if self._free:
                block_id = self._free.popleft()
            else:
                block_id, _ = self._cached.popitem(last=False)
                self._forget_hash(block_id)
                self.num_evictions += 1
            self._ref_counts[block_id] = 1
            ids.append(block_id)
        return ids

    def share(self, block_ids: Iterable[int]) -> None:
        """Add an owner to blocks that are owned or cached (prefix sharing)."""
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0:
                if block_id not in self._cached:
                    raise BlockPoolCorruptedError(f"block {block_id} is free, not shareable")
                del self._cached[block_id]
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one owner from each block; unowned blocks become cached (if hashed) or free.

        Give a sequence's blocks in its order: they are released last to first, so its
        first blocks become the most recently used and eviction takes a prefix's tail before
        its head (evicting block 0 first would leave every later cached block unreachable,
        since prefix hashes chain from the start)."""
        for block_id in reversed(list(block_ids)):
            self._check_id(block_id)
            if self._ref_counts[block_id] <= 0:
                raise BlockPoolCorruptedError(f"block {block_id} is not owned (double free?)")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if block_id in self._hash_of:
                    self._cached[block_id] = None  # most recently used end
                else:
                    self._free.append(block_id)

    def register(self, block_id: int, block_hash: bytes) -> None:
        """Record that an owned, full block holds the KV of the prefix ``block_hash`` names.
        A hash already held by another block keeps that block (this one stays anonymous)."""
        self._check_id(block_id)
        if self._ref_counts[block_id] <= 0:
            raise BlockPoolCorruptedError(f"block {block_id} registered while not owned")
        if block_hash in self._block_of or block_id in self._hash_of:
            return
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id

    def forget(self, block_ids: Iterable[int]) -> None:
        """Withdraw these owned blocks from the prefix cache (their KV is not to be trusted,
        e.g. the model's logits over it were not finite): later lookups no longer find them,
        and when their last owner frees them they go to the free list, not the cache."""
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] <= 0:
                raise BlockPoolCorruptedError(f"block {block_id} forgotten while not owned")
            if block_id in self._hash_of:
                self._forget_hash(block_id)

    def lookup(self, block_hash: bytes) -> int | None:
        """The block holding this prefix's KV (owned or cached), if any."""
        return self._block_of.get(block_hash)

    def held_prefix(self, hashes: Iterable[bytes]) -> int:
        """How many leading ``hashes`` (one prefix's chain) name blocks held here, owned or
        cached: the blocks a prefix-cache lookup of that prompt would find. Read-only."""
        count = 0
        for block_hash in hashes:
            if block_hash not in self._block_of:
                break
            count += 1
        return count

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def intact(self) -> bool:
        """Whether :meth:`check_integrity` passes."""
        try:
            self.check_integrity()
        except Exception:
            return False
        return True

    def check_integrity(self) -> None:
        """Raise :class:`BlockPoolCorruptedError` unless every block is in exactly one state and
        the hash maps agree."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise BlockPoolCorruptedError("a block appears twice in the free list")
        if free & self._cached.keys():
            raise BlockPoolCorruptedError("a block is both free and cached")
        for block_id, count in enumerate(self._ref_counts):
            if count < 0:
                raise BlockPoolCorruptedError(f"block {block_id} has ref count {count}")
            unowned = block_id in free or block_id in self._cached
            if (count == 0) != unowned:
                raise BlockPoolCorruptedError(
                    f"block {block_id} has ref count {count} but is "
                    f"{'in' if unowned else 'not in'} the free or cached set"
                )
            if block_id in self._cached and block_id not in self._hash_of:
                raise BlockPoolCorruptedError(f"cached block {block_id} has no hash")
        for block_id, block_hash in self._hash_of.items():
            if self._block_of.get(block_hash) != block_id or block_id in free:
                raise BlockPoolCorruptedError(f"hash maps disagree on block {block_id}")
        if len(self._block_of) != len(self._hash_of):
            raise BlockPoolCorruptedError("hash maps differ in size")

    def _forget_hash(self, block_id: int) -> None:
        block_hash = self._hash_of.pop(block_id, None)
        if block_hash is not None:
            del self._block_of[block_hash]

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self._num_blocks:
            raise BlockPoolCorruptedError(f"block id {block_id} outside [0, {self._num_blocks})")
