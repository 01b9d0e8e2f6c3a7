"""Ref-counted allocator of KV cache blocks. Pure Python: no torch, testable alone.

Every block is either free (ref count 0, in the free list) or owned (ref count >= 1, not in the
free list). Owners give blocks back with :meth:`BlockPool.free`; a block returns to the free list
when its last owner frees it. :meth:`BlockPool.check_integrity` verifies these invariants.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from engine.errors import BlockPoolCorruptedError, OutOfBlocksError


class BlockPool:
    """Hands out block ids in ``[0, num_blocks)``; all-or-nothing allocation."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self._num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks owned by someone, in [0, 1]."""
        return self.num_used / self._num_blocks

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with ref count 1. Raises :class:`OutOfBlocksError`."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} KV blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        for block_id in ids:
            self._ref_counts[block_id] = 1
        return ids

    def share(self, block_ids: Iterable[int]) -> None:
        """Add an owner to blocks that are already owned (prefix sharing)."""
        for block_id in block_ids:
            self._check_owned(block_id)
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one owner from each block; blocks with no owner left return to the free list."""
        for block_id in block_ids:
            self._check_owned(block_id)
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free.append(block_id)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def check_integrity(self) -> None:
        """Raise :class:`BlockPoolCorruptedError` unless every block is free xor owned."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise BlockPoolCorruptedError("a block appears twice in the free list")
        for block_id, count in enumerate(self._ref_counts):
            if count < 0:
                raise BlockPoolCorruptedError(f"block {block_id} has ref count {count}")
            if (count == 0) != (block_id in free):
                raise BlockPoolCorruptedError(
                    f"block {block_id} has ref count {count} but is "
                    f"{'in' if block_id in free else 'not in'} the free list"
                )

    def _check_owned(self, block_id: int) -> None:
        if not 0 <= block_id < self._num_blocks:
            raise BlockPoolCorruptedError(f"block id {block_id} outside [0, {self._num_blocks})")
        if self._ref_counts[block_id] <= 0:
            raise BlockPoolCorruptedError(f"block {block_id} is not owned (double free?)")
