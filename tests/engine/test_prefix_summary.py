"""The prefix-cache summary a worker advertises, over a real block pool, and the gateway-side
match computed from the same prompt."""

from __future__ import annotations

from core.prefix_hash import prefix_hashes
from core.prefix_summary import (
    MAX_BLOCKS,
    PrefixSummary,
    anchor_depths,
    matched_depth,
    prompt_anchors,
)
from engine.block_pool import BlockPool

BS = 4


def _held(pool: BlockPool):
    return lambda chains: [pool.held_prefix(chain) for chain in chains]


def _cache(pool: BlockPool, tokens: list[int]) -> list[int]:
    """Compute ``tokens``' full blocks into the pool (registered, then freed: cached)."""
    hashes = prefix_hashes(tokens, BS)
    blocks = pool.allocate(len(hashes))
    for block_id, block_hash in zip(blocks, hashes, strict=True):
        pool.register(block_id, block_hash)
    pool.free(blocks)
    return blocks


def test_anchor_depths_are_powers_of_two_up_to_the_bound() -> None:
    assert anchor_depths(0) == []
    assert anchor_depths(5) == [1, 2, 4]
    assert anchor_depths(10_000)[-1] == MAX_BLOCKS


def test_a_worker_advertises_what_its_pool_holds_and_the_gateway_matches_it() -> None:
    pool = BlockPool(64)
    summary = PrefixSummary(BS)
    prompt = list(range(100, 137))  # 37 tokens: 9 reusable blocks
    summary.record(prompt)
    assert summary.advertised(_held(pool)) == []  # recorded, not computed yet: forgotten
    assert len(summary) == 0
    summary.record(prompt)
    _cache(pool, prompt)
    advertised = summary.advertised(_held(pool))
    assert len(advertised) == 4  # depths 1, 2, 4, 8
    follow_up = [*prompt[:30], 1, 2, 3, 4, 5, 6]  # shares 7 full blocks
    assert matched_depth(prompt_anchors(follow_up, BS), set(advertised)) == 4
    assert matched_depth(prompt_anchors(prompt, BS), set(advertised)) == 8
    assert matched_depth(prompt_anchors(list(range(37)), BS), set(advertised)) == 0
    assert prompt_anchors(prompt[:4], BS) == []  # one block, nothing left to compute: no reuse


def test_a_partly_evicted_prefix_is_advertised_as_deep_as_its_leading_blocks() -> None:
    pool = BlockPool(9)
    summary = PrefixSummary(BS)
    prompt = list(range(200, 237))
    hashes = prefix_hashes(prompt, BS)
    summary.record(prompt)
    _cache(pool, prompt)  # 9 blocks: the pool is full of cached blocks
    pool.allocate(1)  # evicts the least recently freed: the prompt's last block
    assert pool.held_prefix(hashes) == 8
    assert matched_depth(prompt_anchors(prompt, BS), set(summary.advertised(_held(pool)))) == 8
    pool.allocate(5)  # and the five before it: three leading blocks are left
    assert pool.held_prefix(hashes) == 3
    advertised = set(summary.advertised(_held(pool)))
    assert len(advertised) == 2  # depths 1 and 2
    assert matched_depth(prompt_anchors(prompt, BS), advertised) == 2
    pool.allocate(3)
    assert summary.advertised(_held(pool)) == []  # nothing left: forgotten


def test_the_summary_is_bounded_and_keeps_the_most_recent_prompts() -> None:
    pool = BlockPool(256)
    summary = PrefixSummary(BS, max_prefixes=3)
    prompts = [[p] * 9 + list(range(10)) for p in range(5)]
    for prompt in prompts:
        summary.record(prompt)
        _cache(pool, prompt)
    advertised = set(summary.advertised(_held(pool)))
    kept = [matched_depth(prompt_anchors(p, BS), advertised) for p in prompts]
    assert kept == [0, 0, 4, 4, 4]
    summary.record(prompts[2])  # seen again: most recent
    summary.record(prompts[0])
    assert len(summary) == 3
    advertised = set(summary.advertised(_held(pool)))
    assert matched_depth(prompt_anchors(prompts[3], BS), advertised) == 0
