"""engine.step_inputs, through ModelRunner.prepare: packed inputs and paged-attention metadata
for a mixed batch.

``prepare`` never calls the model, so a placeholder stands in for it. The last test feeds the
metadata to :func:`engine.attention.paged_attention` and compares with plain causal attention
computed per sequence, which checks that the pieces fit together (``test_attention.py`` does the
same over many random batches).
"""

from __future__ import annotations

import itertools
import random
import types

import pytest
import torch

from core.sampling import SamplingParams
from engine.attention import paged_attention
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence
from engine.step_inputs import (
    GROUP_COST_BLOCKS,
    MAX_DECODE_GROUPS,
    ModelInputs,
    split_by_length,
)

BS = 4
H, KVH, D = 2, 1, 8


def make_cache(num_layers: int = 2, num_blocks: int = 16) -> KVCache:
    return KVCache(num_layers, num_blocks, BS, KVH, D, torch.float32, torch.device("cpu"))


def make_runner(cache: KVCache) -> ModelRunner:
    return ModelRunner(object(), cache, Sampler(seed=0))  # type: ignore[arg-type]


def make_seq(rid: str, num_tokens: int, computed: int, table: list[int], seed: int) -> Sequence:
    tokens = [seed * 100 + i for i in range(num_tokens)]
    seq = Sequence(rid, tokens, num_tokens, SamplingParams(seed=seed))
    seq.block_table = list(table)
    seq.num_computed_tokens = computed
    return seq


def slot(table: list[int], pos: int) -> int:
    return table[pos // BS] * BS + pos % BS


# A: a prefill chunk (positions 3..7 of 10, no sample); B: a decode token (position 5);
# C: a whole short prompt (positions 0..2).
TABLE_A, TABLE_B, TABLE_C = [7, 2, 9], [4, 11], [5]
PACKED_ORDER = (1, 0, 2)  # decode tokens first: b, then a and c


def mixed_batch() -> ScheduledBatch:
    a = make_seq("a", 10, 3, TABLE_A, 1)
    b = make_seq("b", 6, 5, TABLE_B, 2)
    c = make_seq("c", 3, 0, TABLE_C, 3)
    return ScheduledBatch(
        (ScheduledSeq(a, 5, False), ScheduledSeq(b, 1, True), ScheduledSeq(c, 3, True))
    )


@pytest.fixture
def prepared() -> tuple[ScheduledBatch, ModelInputs]:
    batch = mixed_batch()
    return batch, make_runner(make_cache()).prepare(batch)


def test_decode_tokens_are_packed_first(prepared: tuple[ScheduledBatch, ModelInputs]) -> None:
    batch, inputs = prepared
    a, b, c = (item.seq for item in batch.items)
    expected = b.token_ids[5:6] + a.token_ids[3:8] + c.token_ids[0:3]
    assert inputs.input_ids.tolist() == [expected]
    assert inputs.position_ids.tolist() == [[5, 3, 4, 5, 6, 7, 0, 1, 2]]
    assert inputs.input_ids.dtype == inputs.position_ids.dtype == torch.long


def test_slot_mapping(prepared: tuple[ScheduledBatch, ModelInputs]) -> None:
    _, inputs = prepared
    expected = [slot(TABLE_B, 5)] + [slot(TABLE_A, p) for p in range(3, 8)]
    expected += [slot(TABLE_C, p) for p in range(3)]
    assert expected == [45, 31, 8, 9, 10, 11, 20, 21, 22]
    assert inputs.attention.slot_mapping.tolist() == expected


def test_decode_group(prepared: tuple[ScheduledBatch, ModelInputs]) -> None:
    _, inputs = prepared
    (decode,) = inputs.attention.decode
    assert (decode.start, decode.num_seqs) == (0, 1)
    context = decode.context
    assert (context.num_seqs, context.blocks_per_seq) == (1, 2)  # b: 6 positions in 2 blocks
    assert context.block_ids.tolist() == TABLE_B
    assert context.mask is not None and context.mask.shape == (1, 1, 1, 8)
    assert context.mask[0, 0, 0].tolist() == [0.0] * 6 + [float("-inf")] * 2


def test_prefill_group_blocks(prepared: tuple[ScheduledBatch, ModelInputs]) -> None:
    _, inputs = prepared
    prefill = inputs.attention.prefill
    assert prefill is not None and prefill.start == 1 and prefill.context is not None
    context = prefill.context
    assert (context.num_seqs, context.blocks_per_seq) == (2, 2)  # a: 8 positions in 2 blocks
    assert context.block_ids.tolist() == TABLE_A[:2] + TABLE_C + [0]  # padding -> block 0


def test_prefill_mask_is_causal_over_each_context(
    prepared: tuple[ScheduledBatch, ModelInputs],
) -> None:
    _, inputs = prepared
    assert inputs.attention.prefill is not None and inputs.attention.prefill.context is not None
    mask = inputs.attention.prefill.context.mask
    assert mask is not None and mask.shape == (2, 1, 5, 8) and mask.dtype == torch.float32
    for row, (start, length) in enumerate([(3, 5), (0, 3)]):
        for q in range(5):
            attended = (mask[row, 0, q] == 0).nonzero().flatten().tolist()
            if q < length:
                assert attended == list(range(start + q + 1)), (row, q)
            else:
                assert attended == [0], (row, q)  # padding row: one slot, never all-masked
    assert set(mask.unique().tolist()) == {0.0, float("-inf")}


def test_logits_index_and_sample_requests(prepared: tuple[ScheduledBatch, ModelInputs]) -> None:
    batch, inputs = prepared
    assert inputs.logits_index.tolist() == [0, 8]  # b's only token, c's last token
    assert inputs.sample_items == [1, 2]  # rows of logits -> items of the batch
    _, b, c = (item.seq for item in batch.items)
    assert [(r.params, r.position) for r in inputs.sample_requests] == [
        (b.sampling, 6),
        (c.sampling, 3),
    ]


def test_query_and_output_index_round_trip(prepared: tuple[ScheduledBatch, ModelInputs]) -> None:
    _, inputs = prepared
    prefill = inputs.attention.prefill
    assert prefill is not None
    query_index, output_index = prefill.query_index, prefill.output_index
    assert query_index is not None and output_index is not None
    assert query_index.shape == (2, 5)
    assert query_index[0].tolist() == [0, 1, 2, 3, 4]
    assert query_index[1, :3].tolist() == [5, 6, 7]
    packed = torch.arange(100, 108)  # (T,) the prefill group's tokens
    padded = packed[query_index]  # (B, Q)
    assert padded.flatten()[output_index].tolist() == packed.tolist()


def test_decode_only_batch() -> None:
    cache = make_cache()
    seqs = [make_seq("a", 6, 5, [3, 8], 1), make_seq("b", 9, 8, [1, 0, 6], 2)]
    batch = ScheduledBatch(tuple(ScheduledSeq(s, 1, True) for s in seqs))
    inputs = make_runner(cache).prepare(batch)
    assert inputs.attention.prefill is None
    (decode,) = inputs.attention.decode  # close lengths: one group, padded to 3 blocks
    assert (decode.start, decode.num_seqs) == (0, 2)
    assert inputs.position_ids.tolist() == [[5, 8]]
    assert inputs.attention.slot_mapping.tolist() == [8 * BS + 1, 6 * BS + 0]
    assert decode.context.block_ids.tolist() == [3, 8, 0, 1, 0, 6]
    mask = decode.context.mask
    assert mask is not None and mask.shape == (2, 1, 1, 12)
    assert (mask[0, 0, 0] == 0).tolist() == [True] * 6 + [False] * 6
    assert (mask[1, 0, 0] == 0).tolist() == [True] * 9 + [False] * 3
    assert inputs.logits_index.tolist() == [0, 1]


def test_full_blocks_need_no_decode_mask() -> None:
    seqs = [make_seq("a", 8, 7, [3, 8], 1), make_seq("b", 8, 7, [1, 0], 2)]
    batch = ScheduledBatch(tuple(ScheduledSeq(s, 1, True) for s in seqs))
    (decode,) = make_runner(make_cache()).prepare(batch).attention.decode
    assert decode.context.mask is None


def test_single_prefill_sequence_attends_itself() -> None:
    seq = make_seq("a", 5, 0, [2, 3], 1)
    inputs = make_runner(make_cache()).prepare(ScheduledBatch((ScheduledSeq(seq, 5, True),)))
    assert inputs.attention.slot_mapping.tolist() == [8, 9, 10, 11, 12]
    assert inputs.logits_index.tolist() == [4]
    assert inputs.attention.decode == ()
    prefill = inputs.attention.prefill
    assert prefill is not None and prefill.start == 0
    assert prefill.context is None and prefill.query_index is None  # no gather, no padding


def test_fresh_prompts_attend_themselves_unpadded() -> None:
    seqs = [make_seq("a", 5, 0, [2, 3], 1), make_seq("b", 2, 0, [4], 2)]
    batch = ScheduledBatch(tuple(ScheduledSeq(s, s.num_tokens, True) for s in seqs))
    prefill = make_runner(make_cache()).prepare(batch).attention.prefill
    assert prefill is not None and prefill.context is None  # no gather: no blocks, no mask
    assert prefill.lengths == (5, 2)  # one causal attention each, nothing padded
    assert prefill.query_index is None


def test_decode_groups_split_by_context_length() -> None:
    cache = make_cache(num_blocks=256)
    lengths = [40, 3, 41, 2, 39, 4, 1, 42]  # tokens computed: two clusters, 1-4 and 39-42
    seqs = []
    for i, n in enumerate(lengths):
        table = list(range(i * 12, i * 12 + -(-(n + 1) // BS)))
        seqs.append(make_seq(f"s{i}", n + 1, n, table, i))
    batch = ScheduledBatch(tuple(ScheduledSeq(s, 1, True) for s in seqs))
    inputs = make_runner(cache).prepare(batch)
    groups = inputs.attention.decode
    assert [(g.start, g.num_seqs, g.context.blocks_per_seq) for g in groups] == [
        (0, 4, 2),  # contexts of 2-5 tokens: 1-2 blocks
        (4, 4, 11),  # contexts of 40-43 tokens: 10-11 blocks
    ]
    assert inputs.position_ids.tolist() == [sorted(lengths)]  # shortest context first
    assert inputs.sample_items == [6, 3, 1, 5, 4, 0, 2, 7]


def brute_force_cost(blocks: list[int]) -> int:
    """Least padded blocks + GROUP_COST_BLOCKS per group over every split into contiguous
    groups of at most MAX_DECODE_GROUPS."""
    n, best = len(blocks), None
    for k in range(min(MAX_DECODE_GROUPS, n)):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = [0, *cuts, n]
            cost = sum(
                (end - start) * blocks[end - 1] + GROUP_COST_BLOCKS
                for start, end in itertools.pairwise(bounds)
            )
            best = cost if best is None else min(best, cost)
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(40))
def test_split_by_length_is_optimal(seed: int) -> None:
    rng = random.Random(seed)
    blocks = sorted(rng.randint(1, 40) for _ in range(rng.randint(1, 9)))
    groups = split_by_length(blocks)
    assert groups[0][0] == 0 and groups[-1][1] == len(blocks) and len(groups) <= 4
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in itertools.pairwise(groups))
    cost = sum((end - start) * blocks[end - 1] + GROUP_COST_BLOCKS for start, end in groups)
    assert cost == brute_force_cost(blocks)


def test_split_by_length_keeps_equal_lengths_together() -> None:
    assert split_by_length([]) == []
    assert split_by_length([9] * 16) == [(0, 16)]
    assert split_by_length([1] * 8 + [30] * 8) == [(0, 8), (8, 16)]


def test_workspace_is_reused_across_steps() -> None:
    runner = make_runner(make_cache())
    seqs = [make_seq(f"s{i}", 9, 8, [i, i + 4, i + 8], i) for i in range(3)]
    big = runner.prepare(ScheduledBatch(tuple(ScheduledSeq(s, 1, True) for s in seqs)))
    small = runner.prepare(ScheduledBatch((ScheduledSeq(seqs[0], 1, True),)))
    assert big.attention.workspace.numel() >= 2 * 9 * BS * KVH * D
    assert small.attention.workspace.data_ptr() == big.attention.workspace.data_ptr()


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int):
    """Causal attention of queries at positions start.. over keys 0..

    q (n, H, D), k and v (c, KVH, D); returns (n, H, D).
    """
    k = k.repeat_interleave(H // KVH, dim=1)  # (c, H, D)
    v = v.repeat_interleave(H // KVH, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q, k) / D**0.5  # (H, n, c)
    positions = torch.arange(start, start + q.shape[0])
    scores.masked_fill_(torch.arange(k.shape[0])[None, :] > positions[:, None], float("-inf"))
    return torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)  # (n, H, D)


def test_metadata_drives_paged_attention_like_plain_attention() -> None:
    gen = torch.Generator().manual_seed(0)
    cache = make_cache()
    batch = mixed_batch()
    runner = make_runner(cache)
    packed = [batch.items[i] for i in PACKED_ORDER]
    # Context already computed: positions [0, num_computed) of each sequence, in its blocks.
    contexts_k, contexts_v = [], []
    for item in packed:
        seq = item.seq
        total = seq.num_computed_tokens + item.num_new_tokens
        k = torch.randn((total, KVH, D), generator=gen)
        v = torch.randn((total, KVH, D), generator=gen)
        for p in range(seq.num_computed_tokens):
            s = slot(seq.block_table, p)
            cache.kv[1, 0, s // BS, s % BS] = k[p]
            cache.kv[1, 1, s // BS, s % BS] = v[p]
        contexts_k.append(k)
        contexts_v.append(v)
    inputs = runner.prepare(batch)
    new_k = torch.cat(
        [k[item.seq.num_computed_tokens :] for k, item in zip(contexts_k, packed, strict=True)]
    )
    new_v = torch.cat(
        [v[item.seq.num_computed_tokens :] for v, item in zip(contexts_v, packed, strict=True)]
    )
    n = new_k.shape[0]
    query = torch.randn((n, H, D), generator=gen)
    module = types.SimpleNamespace(layer_idx=1)
    out, _ = paged_attention(
        module,  # type: ignore[arg-type]
        query.transpose(0, 1)[None],  # (1, H, N, D)
        new_k.transpose(0, 1)[None],  # (1, KVH, N, D)
        new_v.transpose(0, 1)[None],
        None,
        scaling=D**-0.5,
        pdserve_batch=inputs.attention,
    )
    assert out.shape == (1, n, H, D)
    offset = 0
    for item, k, v in zip(packed, contexts_k, contexts_v, strict=True):
        start, count = item.seq.num_computed_tokens, item.num_new_tokens
        expected = reference_attention(query[offset : offset + count], k, v, start)
        torch.testing.assert_close(out[0, offset : offset + count], expected)
        offset += count
    # the new tokens' K and V landed in their slots of layer 1 only
    slots = cache.layer_slots(1)
    torch.testing.assert_close(slots[0][inputs.attention.slot_mapping], new_k)
    torch.testing.assert_close(slots[1][inputs.attention.slot_mapping], new_v)
    assert not cache.kv[0].any()


def test_a_draft_is_one_decode_row_per_token_each_sampled() -> None:
    # d: 6 tokens, 5 computed, a 2-token draft (positions 5, 6, 7); p: a plain decode token
    d = make_seq("d", 6, 5, [4, 11], 2)
    d.sampling = SamplingParams(seed=2, repetition_penalty=1.2)
    p = make_seq("p", 3, 2, [6], 1)
    batch = ScheduledBatch(
        (ScheduledSeq(d, 3, True, draft=(70, 80), draft_slots=2), ScheduledSeq(p, 1, True))
    )
    inputs = make_runner(make_cache()).prepare(batch)
    # rows by context length: p's (position 2), then d's three
    assert inputs.input_ids.tolist() == [[102, 205, 70, 80]]
    assert inputs.position_ids.tolist() == [[2, 5, 6, 7]]
    table = [4, 11]
    assert inputs.attention.slot_mapping.tolist() == [6 * BS + 2] + [
        slot(table, q) for q in (5, 6, 7)
    ]
    assert inputs.sample_items == [1, 0, 0, 0]
    assert inputs.sample_offsets == [0, 0, 1, 2]
    assert inputs.logits_index.tolist() == [0, 1, 2, 3]
    assert [r.position for r in inputs.sample_requests] == [3, 6, 7, 8]
    # a penalized row sees the draft tokens before it as output so far
    assert list(inputs.sample_requests[3].token_ids) == [*d.token_ids, 70, 80]
    native = inputs.attention.native
    if native is not None:
        assert native.context_len.tolist() == [3, 6, 7, 8]
    else:
        assert inputs.attention.prefill is None  # no draft row goes the prefill way
