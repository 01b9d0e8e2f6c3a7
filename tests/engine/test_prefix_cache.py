"""Prefix caching: chained block hashes, the pool's cached state, scheduler hits, and greedy
output unchanged by hits (tiny model vs transformers)."""

from __future__ import annotations

import pytest
import torch

from core.errors import BlockPoolCorruptedError
from core.prefix_hash import ROOT, block_hash, prefix_hashes
from core.sampling import FinishReason, SamplingParams
from engine.block_pool import BlockPool
from engine.config import SchedulerConfig
from engine.sampler import BAD_LOGITS_TOKEN
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence
from tests.engine.test_engine import _engine, _generated, _run_to_completion, tiny  # noqa: F401

BS = 4


def test_hashes_chain_over_the_whole_prefix():
    a = prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    b = prefix_hashes([1, 2, 3, 4, 5, 6, 7, 0], BS)
    c = prefix_hashes([0, 2, 3, 4, 5, 6, 7, 8], BS)
    assert len(a) == 2  # the partial third block has no hash
    assert a[0] == b[0] and a[1] != b[1]
    assert c[1] != a[1]  # same second block, different first: a different prefix
    assert a[1] == block_hash(block_hash(ROOT, [1, 2, 3, 4]), [5, 6, 7, 8])
    assert prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS, start=1, parent=a[0]) == [a[1]]


def test_pool_keeps_freed_hashed_blocks_until_evicted_lru():
    pool = BlockPool(3)
    x, y, z = pool.allocate(3)
    pool.register(x, b"x" * 16)
    pool.register(y, b"y" * 16)
    pool.free([x, y])
    assert pool.num_free == 2 and pool.num_cached == 2
    assert pool.lookup(b"x" * 16) == x
    pool.share([x])  # revive: owned again, no longer evictable
    assert pool.ref_count(x) == 1 and pool.num_cached == 1
    pool.free([z])  # unhashed: plain free
    (first,) = pool.allocate(1)
    assert first == z  # free blocks go before cached ones
    (evicted,) = pool.allocate(1)
    assert evicted == y and pool.lookup(b"y" * 16) is None and pool.num_evictions == 1
    pool.check_integrity()
    with pytest.raises(BlockPoolCorruptedError):
        pool.register(BlockPool(1).num_blocks + 5, b"q" * 16)


def test_duplicate_hash_keeps_the_first_block():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, b"h" * 16)
    pool.register(b, b"h" * 16)
    pool.free([a, b])
    assert pool.lookup(b"h" * 16) == a and pool.num_cached == 1
    pool.check_integrity()


def _seq(rid: str, tokens: list[int], max_tokens: int = 3) -> Sequence:
    return Sequence(
        rid, list(tokens), len(tokens), SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    )


def _run(sched: Scheduler) -> None:
    for _ in range(200):
        batch = sched.schedule()
        if batch is None:
            return
        finished = sched.update(batch, [7] * len(batch.items))
        for f in finished:
            sched.release(f.seq, f.reason)


def test_scheduler_reuses_cached_blocks_and_still_computes_one_token():
    pool = BlockPool(16)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), pool, BS)
    prompt = list(range(100, 112))  # 3 full blocks
    sched.add(_seq("a", prompt))
    _run(sched)
    assert pool.num_cached >= 3 and sched.prefix_hit_tokens == 0
    b = _seq("b", prompt)  # fully cached prompt: the last block is recomputed, not shared
    sched.add(b)
    batch = sched.schedule()
    assert batch is not None and batch.items[0].num_new_tokens == 4
    assert b.num_cached_tokens == 8 and sched.prefix_hit_tokens == 8
    c = _seq("c", [*prompt[:9], 1, 2, 3, 4])  # shares 2 blocks with a
    sched.add(c)
    batch2 = sched.schedule()
    assert batch2 is not None
    assert c.block_table[:2] == b.block_table[:2]  # the same physical blocks, shared
    assert pool.ref_count(c.block_table[0]) == 2
    pool.check_integrity()
    sched.update(batch, [7])
    sched.update(batch2, [7] * len(batch2.items))
    _run(sched)
    pool.check_integrity()
    assert pool.num_free == pool.num_blocks


def test_prefix_hits_keep_greedy_output_identical(tiny):  # noqa: F811
    model, spec, _ = tiny
    prefix = [
        int(x) for x in torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(5))
    ]
    prompts = [[*prefix, 7, 8, 9], [*prefix, 11], [*prefix, 7, 8, 9], [*prefix[:20], 42, 43]]
    expected = []
    for i, prompt in enumerate(prompts):  # one engine per prompt: no cache in play
        fresh = _engine(model, spec)
        fresh.scheduler.config = SchedulerConfig(enable_prefix_caching=False)
        fresh.add(
            Sequence(
                f"p{i}",
                list(prompt),
                len(prompt),
                SamplingParams(max_tokens=10, temperature=0),
                spec.eos_token_ids,
            )
        )
        expected.append(_generated(_run_to_completion(fresh), f"p{i}"))
    cached = _engine(model, spec)
    outputs = []
    for i, prompt in enumerate(prompts):  # one after another: each can hit the previous ones
        cached.add(
            Sequence(
                f"p{i}",
                list(prompt),
                len(prompt),
                SamplingParams(max_tokens=10, temperature=0),
                spec.eos_token_ids,
            )
        )
        outputs.extend(_run_to_completion(cached))
    assert cached.scheduler.prefix_hit_tokens == 40 + 40 + 20  # full blocks of the shared prefix
    for i, want in enumerate(expected):
        assert _generated(outputs, f"p{i}") == want
    cached.pool.check_integrity()
    assert cached.pool.num_free == cached.pool.num_blocks


def test_eviction_takes_a_freed_prefix_tail_first():
    """A finished sequence's blocks are released last to first: under pressure the pool
    evicts the tail of its prefix and keeps the head, which later prompts can still hit
    (evicting block 0 first would strand every later block: hashes chain from the start)."""
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    hashes = prefix_hashes(list(range(3 * BS)), BS)
    for block_id, block_hash_ in zip(blocks, hashes, strict=True):
        pool.register(block_id, block_hash_)
    pool.free(blocks)  # in sequence order, as the scheduler frees a block table
    (taken,) = pool.allocate(1)
    assert taken == blocks[2]
    assert pool.held_prefix(hashes) == 2  # the first two blocks still hit


def test_a_row_whose_model_logits_were_not_finite_leaves_nothing_in_the_prefix_cache():
    """Its KV may hold NaN (NaN spreads through attention to every later position): a later
    prompt with the same prefix must recompute it, not share it, and the pool stays whole."""
    pool = BlockPool(16)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), pool, BS)
    prompt = list(range(100, 112))  # 3 full blocks
    poisoned = _seq("a", prompt)
    sched.add(poisoned)
    batch = sched.schedule()
    assert batch is not None
    finished = sched.update(batch, [BAD_LOGITS_TOKEN])
    assert [f.reason for f in finished] == [FinishReason.ERROR]
    sched.release(poisoned, FinishReason.ERROR)
    pool.check_integrity()
    assert pool.num_cached == 0 and pool.num_free == pool.num_blocks
    again = _seq("b", prompt)
    sched.add(again)
    sched.schedule()
    assert again.num_cached_tokens == 0 and sched.prefix_hit_tokens == 0


def test_a_failed_row_withdraws_the_prefix_blocks_it_shares_with_a_live_sequence():
    pool = BlockPool(16)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), pool, BS)
    prompt = list(range(100, 112))
    sched.add(_seq("a", prompt, max_tokens=8))
    sched.update(_scheduled(sched), [7])  # a: prefilled, its blocks cached and still owned
    b = _seq("b", [*prompt[:8], 1, 2, 3, 4])  # shares a's first 2 blocks
    sched.add(b)
    batch = _scheduled(sched)
    assert b.num_cached_tokens == 8
    sched.update(batch, [7 if item.seq is not b else BAD_LOGITS_TOKEN for item in batch.items])
    sched.release(b, FinishReason.ERROR)
    pool.check_integrity()
    c = _seq("c", prompt)
    sched.add(c)
    _scheduled(sched)
    assert c.num_cached_tokens == 0  # the shared blocks were withdrawn with the poisoned row
    _run(sched)
    pool.check_integrity()
    assert pool.num_free == pool.num_blocks


def _scheduled(sched: Scheduler) -> ScheduledBatch:
    batch = sched.schedule()
    assert batch is not None
    return batch
