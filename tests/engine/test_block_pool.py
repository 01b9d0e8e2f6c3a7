"""BlockPool: all-or-nothing allocation, ref-counted sharing, and a self-check that catches
corruption. The random test drives the pool against a reference model of who owns what."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from core.errors import BlockPoolCorruptedError, OutOfBlocksError
from engine.block_pool import BlockPool


def snapshot(pool: BlockPool) -> tuple[list[int], list[int]]:
    return sorted(pool._free), [pool.ref_count(b) for b in range(pool.num_blocks)]


def test_new_pool_is_all_free() -> None:
    pool = BlockPool(8)
    assert (pool.num_blocks, pool.num_free, pool.num_used, pool.usage) == (8, 8, 0, 0.0)
    pool.check_integrity()


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_pool_needs_a_positive_size(num_blocks: int) -> None:
    with pytest.raises(ValueError):
        BlockPool(num_blocks)


def test_allocate_gives_distinct_owned_blocks() -> None:
    pool = BlockPool(8)
    ids = pool.allocate(5)
    assert len(set(ids)) == 5
    assert all(0 <= b < 8 and pool.ref_count(b) == 1 for b in ids)
    assert (pool.num_free, pool.num_used) == (3, 5)
    assert pool.allocate(0) == []
    pool.check_integrity()


def test_allocation_is_all_or_nothing() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    before = snapshot(pool)
    assert not pool.can_allocate(2)
    with pytest.raises(OutOfBlocksError):
        pool.allocate(2)
    assert snapshot(pool) == before
    pool.check_integrity()
    assert pool.can_allocate(1)
    assert len(pool.allocate(1)) == 1
    assert pool.num_free == 0


def test_negative_allocation_is_refused() -> None:
    pool = BlockPool(4)
    assert not pool.can_allocate(-1)
    with pytest.raises(ValueError):
        pool.allocate(-1)
    assert pool.num_free == 4


def test_free_returns_blocks() -> None:
    pool = BlockPool(4)
    ids = pool.allocate(4)
    pool.free(ids[:2])
    assert pool.num_free == 2
    assert all(pool.ref_count(b) == 0 for b in ids[:2])
    pool.free(ids[2:])
    assert pool.num_free == 4
    assert sorted(pool.allocate(4)) == [0, 1, 2, 3]
    pool.check_integrity()


def test_shared_block_is_freed_by_its_last_owner_only() -> None:
    pool = BlockPool(4)
    ids = pool.allocate(2)
    pool.share(ids)
    pool.share(ids[:1])
    assert [pool.ref_count(b) for b in ids] == [3, 2]
    pool.free(ids)
    assert pool.num_free == 2  # both still owned
    pool.free(ids)
    assert pool.num_free == 3  # ids[1] lost its last owner
    assert pool.ref_count(ids[0]) == 1
    pool.free(ids[:1])
    assert pool.num_free == 4
    pool.check_integrity()


def test_share_of_a_free_block_is_corruption() -> None:
    pool = BlockPool(4)
    with pytest.raises(BlockPoolCorruptedError):
        pool.share([0])
    assert pool.ref_count(0) == 0
    pool.check_integrity()


def test_double_free_raises() -> None:
    pool = BlockPool(4)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(BlockPoolCorruptedError, match="double free"):
        pool.free(ids)
    assert pool.num_free == 4
    pool.check_integrity()


@pytest.mark.parametrize("block_id", [-1, 4, 1000])
def test_out_of_range_ids_raise(block_id: int) -> None:
    pool = BlockPool(4)
    pool.allocate(4)
    with pytest.raises(BlockPoolCorruptedError, match="outside"):
        pool.free([block_id])
    with pytest.raises(BlockPoolCorruptedError, match="outside"):
        pool.share([block_id])
    pool.check_integrity()


def test_usage_ratio() -> None:
    pool = BlockPool(10)
    ids = pool.allocate(3)
    assert pool.usage == pytest.approx(0.3)
    pool.share(ids)  # sharing does not use more blocks
    assert pool.usage == pytest.approx(0.3)
    pool.allocate(7)
    assert pool.usage == 1.0
    pool.free(ids)
    pool.free(ids)
    assert pool.usage == pytest.approx(0.7)


def test_random_operations_match_a_reference_model() -> None:
    rng = random.Random(1234)
    num_blocks = 64
    pool = BlockPool(num_blocks)
    owners: dict[int, list[int]] = {}  # owner id -> blocks it holds (one ref each)
    next_owner = 0
    for step in range(5000):
        op = rng.random()
        if op < 0.4:
            n = rng.randint(0, 12)
            free = num_blocks - len({b for blocks in owners.values() for b in blocks})
            if n <= free:
                ids = pool.allocate(n)
                held = {b for blocks in owners.values() for b in blocks}
                assert not held.intersection(ids), step  # never hands out an owned block
                owners[next_owner] = ids
                next_owner += 1
            else:
                with pytest.raises(OutOfBlocksError):
                    pool.allocate(n)
        elif op < 0.6 and owners:
            source = owners[rng.choice(list(owners))]
            prefix = source[: rng.randint(0, len(source))]
            pool.share(prefix)
            owners[next_owner] = list(prefix)
            next_owner += 1
        elif owners:
            pool.free(owners.pop(rng.choice(list(owners))))
        refs = Counter(b for blocks in owners.values() for b in blocks)
        assert pool.num_used == len(refs), step
        if step % 50 == 0:
            assert [pool.ref_count(b) for b in range(num_blocks)] == [
                refs.get(b, 0) for b in range(num_blocks)
            ]
            pool.check_integrity()
    for blocks in owners.values():
        pool.free(blocks)
    assert pool.num_free == num_blocks
    pool.check_integrity()


def test_integrity_detects_duplicate_in_free_list() -> None:
    pool = BlockPool(4)
    pool._free.append(0)
    with pytest.raises(BlockPoolCorruptedError, match="twice"):
        pool.check_integrity()


def test_integrity_detects_negative_ref_count() -> None:
    pool = BlockPool(4)
    pool._ref_counts[2] = -1
    with pytest.raises(BlockPoolCorruptedError, match="ref count -1"):
        pool.check_integrity()


def test_integrity_detects_owned_block_in_free_list() -> None:
    pool = BlockPool(4)
    pool._ref_counts[1] = 1  # owned, yet still in the free list
    with pytest.raises(BlockPoolCorruptedError, match="block 1"):
        pool.check_integrity()


def test_integrity_detects_leaked_block() -> None:
    pool = BlockPool(4)
    ids = pool.allocate(1)
    pool._ref_counts[ids[0]] = 0  # nobody owns it, yet it is not free
    with pytest.raises(BlockPoolCorruptedError, match="not in"):
        pool.check_integrity()
