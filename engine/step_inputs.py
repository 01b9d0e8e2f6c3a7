"""A step's packed model inputs: token ids, positions, KV slots and each token's attention
context, built from a :class:`~engine.scheduler.ScheduledBatch`.

The batch is packed: the new tokens of all sequences form one row ``(1, N)``, decode rows first
(one token each, sorted by context length), then prefill chunks. A sequence with a draft
(speculative decoding) is one decode row per token: its last token, then each draft token, each
attending the context up to its own position, so each row's logits are what a plain decode
step at that position computes. Sampled rows are each item's last token, or every row of a
draft (``sample_offsets``: the row's place in it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from engine.attention import (
    AttentionBatch,
    ContextGather,
    DecodeGroup,
    NativeDecode,
    PrefillGroup,
)
from engine.attention_varlen import SeqSpan, VarlenBatch, VarlenKernel, build_varlen_batch
from engine.kernels import PagedAttentionKernel
from engine.kv_cache import KVCache
from engine.sampler import SampleRequest
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence as EngineSequence


class ModelInputs(NamedTuple):
    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N)
    attention: AttentionBatch
    logits_index: torch.Tensor  # (S,) packed index of each sampled row's token
    sample_requests: list[SampleRequest]
    sample_items: list[int]  # (S,) index in ``batch.items`` of each sampled row
    sample_offsets: list[int]  # (S,) each row's place in its item's draft (0: no draft)


class _Span(NamedTuple):
    """Positions ``[start, start + size)`` of one sequence computed in the step."""

    seq: EngineSequence
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


class InputBuilder:
    """Builds each step's :class:`ModelInputs` over one KV cache; keeps the gather path's
    scratch tensor across steps."""

    def __init__(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self._workspace = torch.empty(0, dtype=kv_cache.dtype, device=self.device)

    def build(
        self,
        batch: ScheduledBatch,
        kernel: PagedAttentionKernel | None,
        varlen_kernel: VarlenKernel | None,
    ) -> ModelInputs:
        """The step's inputs; decode attention through ``kernel`` (CPU) or every token's
        through ``varlen_kernel`` (CUDA) when given, else the gather path."""
        bs = self.kv_cache.block_size
        # decode rows: one per decoding token (a draft's tokens included), by context length
        rows = [
            (i, j)
            for i, item in enumerate(batch.items)
            if item.num_new_tokens == 1 or item.draft
            for j in range(item.num_new_tokens)
        ]
        rows.sort(key=lambda r: batch.items[r[0]].seq.num_computed_tokens + r[1])  # stable
        num_decode = len(rows)
        rows += [
            (i, 0)
            for i, item in enumerate(batch.items)
            if item.num_new_tokens > 1 and not item.draft
        ]
        spans: list[_Span] = []
        input_ids: list[int] = []
        slot_mapping: list[int] = []
        sampled: list[tuple[int, int, int]] = []  # (packed index, item, offset) of sampled rows
        for k, (i, j) in enumerate(rows):
            item = batch.items[i]
            seq, start = item.seq, item.seq.num_computed_tokens + j
            count = 1 if k < num_decode else item.num_new_tokens
            if j:
                input_ids.append(item.draft[j - 1])
            else:
                input_ids.extend(seq.token_ids[start : start + count])
            table = seq.block_table
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, start + count))
            spans.append(_Span(seq, start, count))
            if item.sample:
                sampled.append((len(input_ids) - 1, i, j))
        positions = [p for span in spans for p in range(span.start, span.end)]
        native = None
        decode: tuple[DecodeGroup, ...] = ()
        prefill = None
        varlen = None
        if varlen_kernel is not None and spans:
            varlen = self._varlen_batch(varlen_kernel, spans)
        elif kernel is not None and num_decode:
            native = self._native_decode(kernel, spans[:num_decode])
        else:
            decode = tuple(
                DecodeGroup(start, end - start, self._context(spans[start:end], query_len=1))
                for start, end in split_by_length(
                    [-(-(span.start + 1) // bs) for span in spans[:num_decode]]
                )
            )
        if varlen is None and num_decode < len(spans):
            prefill = self._prefill_group(spans[num_decode:], start=num_decode)
        dev = self.device
        attention = AttentionBatch(
            kv_cache=self.kv_cache,
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=dev),
            decode=decode,
            prefill=prefill,
            native=native,
            workspace=self._workspace_for(decode, prefill),
            varlen=varlen,
        )
        return ModelInputs(
            input_ids=torch.tensor([input_ids], dtype=torch.long, device=dev),
            position_ids=torch.tensor([positions], dtype=torch.long, device=dev),
            attention=attention,
            logits_index=torch.tensor([k for k, _, _ in sampled], dtype=torch.long, device=dev),
            sample_requests=[sample_request(batch.items[i], j) for _, i, j in sampled],
            sample_items=[i for _, i, _ in sampled],
            sample_offsets=[j for _, _, j in sampled],
        )

    def _varlen_batch(self, kernel: VarlenKernel, spans: Sequence[_Span]) -> VarlenBatch:
        spans_ = [SeqSpan(span.start, span.size, span.seq.block_table) for span in spans]
        return build_varlen_batch(spans_, self.kv_cache.block_size, self.device, kernel)

    def _native_decode(self, kernel: PagedAttentionKernel, spans: Sequence[_Span]) -> NativeDecode:
        bs = self.kv_cache.block_size
        lengths = [span.start + 1 for span in spans]
        max_blocks = -(-max(lengths) // bs)
        table = _padded_block_tables(spans, max_blocks)
        dev = self.device
        return NativeDecode(
            kernel=kernel,
            block_table=torch.tensor(table, dtype=torch.long, device=dev).view(len(spans), -1),
            context_len=torch.tensor(lengths, dtype=torch.long, device=dev),
        )

    def _prefill_group(self, spans: Sequence[_Span], start: int) -> PrefillGroup:
        """Sequences with several new tokens, packed from ``start`` on."""
        fresh = all(span.start == 0 for span in spans)
        lengths = [span.size for span in spans]
        if fresh:  # each prompt attends its own tokens: no context, no padding
            return PrefillGroup(start, tuple(lengths), None, None, None)
        max_q = max(lengths)
        context = self._context(spans, query_len=max_q)
        if len(spans) == 1:
            return PrefillGroup(start, tuple(lengths), context, None, None)
        length_t = torch.tensor(lengths)  # (B,)
        q_off = torch.arange(max_q)  # (Q,)
        q_valid = q_off[None, :] < length_t[:, None]  # (B, Q)
        offsets = torch.cumsum(length_t, 0) - length_t  # (B,) group index of each first token
        query_index = (offsets[:, None] + q_off[None, :]).masked_fill(~q_valid, 0)  # (B, Q)
        output_index = (torch.arange(len(spans))[:, None] * max_q + q_off[None, :])[q_valid]
        dev = self.device
        return PrefillGroup(
            start, tuple(lengths), context, query_index.to(dev), output_index.to(dev)
        )

    def _context(self, spans: Sequence[_Span], query_len: int) -> ContextGather:
        """Block ids and mask for spans whose queries are padded to ``query_len``."""
        bs = self.kv_cache.block_size
        starts = [span.start for span in spans]
        ends = [span.end for span in spans]
        max_blocks = -(-max(ends) // bs)
        block_ids = _padded_block_tables(spans, max_blocks)
        dev = self.device
        context_len = max_blocks * bs
        mask = None
        if query_len > 1 or min(ends) < context_len:
            mask = self._mask(starts, ends, query_len, context_len)
        return ContextGather(
            block_ids=torch.tensor(block_ids, dtype=torch.long, device=dev),
            num_seqs=len(spans),
            blocks_per_seq=max_blocks,
            mask=mask,
        )

    def _mask(
        self, starts: list[int], ends: list[int], query_len: int, context_len: int
    ) -> torch.Tensor:
        """``(B, 1, Q, C)`` additive mask: causal over each context, padding hidden."""
        start_t = torch.tensor(starts)  # (B,)
        end_t = torch.tensor(ends)  # (B,)
        ctx_pos = torch.arange(context_len)  # (C,)
        q_pos = start_t[:, None] + torch.arange(query_len)[None, :]  # (B, Q) absolute positions
        q_valid = q_pos < end_t[:, None]  # (B, Q)
        allowed = ctx_pos[None, None, :] <= q_pos[:, :, None]  # (B, Q, C)
        allowed &= q_valid[:, :, None]
        allowed[:, :, 0] |= ~q_valid  # padded query rows attend one slot: no all-masked rows
        mask = torch.zeros(allowed.shape, dtype=self.kv_cache.dtype)
        mask.masked_fill_(~allowed, float("-inf"))
        return mask.unsqueeze(1).to(self.device)

    def _workspace_for(
        self, decode: tuple[DecodeGroup, ...], prefill: PrefillGroup | None
    ) -> torch.Tensor:
        """A scratch tensor large enough for any group's gathered K and V, kept across steps so
        that it is allocated (and its pages faulted in) only when it grows."""
        contexts = [g.context for g in (*decode, prefill) if g is not None]
        counts = [c.block_ids.numel() for c in contexts if c is not None]
        cache = self.kv_cache
        needed = 2 * max(counts, default=0) * cache.block_size * cache.num_kv_heads * cache.head_dim
        if self._workspace.numel() < needed:
            self._workspace = torch.empty(needed, dtype=cache.dtype, device=self.device)
        return self._workspace


def sample_request(item: ScheduledSeq, offset: int = 0) -> SampleRequest:
    """What the sampler needs of an item's next token, or of the token after its draft's first
    ``offset`` tokens: the sequence's token ids by reference (read only by penalties; with the
    draft's tokens before that one when penalties read them)."""
    seq = item.seq
    tokens: Sequence[int] = seq.token_ids
    if offset and seq.sampling.penalized:
        tokens = [*seq.token_ids, *item.draft[:offset]]
    return SampleRequest(
        seq.sampling, seq.num_tokens + offset, tokens, seq.output_start, seq.eos_token_ids
    )


def _padded_block_tables(spans: Sequence[_Span], max_blocks: int) -> list[int]:
    """The spans' block tables, each cut or padded (with block 0) to ``max_blocks``, flat."""
    flat: list[int] = []
    for span in spans:
        row = span.seq.block_table[:max_blocks]
        flat.extend(row)
        flat.extend([0] * (max_blocks - len(row)))
    return flat


GROUP_COST_BLOCKS = 8
"""What one more decode group costs per layer (a few op launches, ~20 us), in gathered blocks."""
MAX_DECODE_GROUPS = 4


def split_by_length(blocks: Sequence[int]) -> list[tuple[int, int]]:
    """Split sequences sorted by context length into groups ``[start, end)``, each padded to its
    longest member, minimizing padded blocks plus :data:`GROUP_COST_BLOCKS` per group.

    ``blocks``: each sequence's context in blocks, ascending. Exact dynamic programme over the
    distinct lengths (a cut between equal lengths never helps), at most
    :data:`MAX_DECODE_GROUPS` groups: a few hundred steps of Python."""
    if not blocks:
        return []
    ends = [i + 1 for i in range(len(blocks)) if i + 1 == len(blocks) or blocks[i + 1] != blocks[i]]
    m = len(ends)  # distinct lengths; ends[j]: sequences with length <= the j-th one
    inf = float("inf")
    # best[g][j]: least cost of the first j distinct lengths in g groups; cut[g][j]: where the
    # last of those groups starts (an index into the distinct lengths)
    best = [[inf] * (m + 1) for _ in range(MAX_DECODE_GROUPS + 1)]
    cut = [[0] * (m + 1) for _ in range(MAX_DECODE_GROUPS + 1)]
    best[0][0] = 0.0
    for g in range(1, MAX_DECODE_GROUPS + 1):
        for j in range(g, m + 1):
            longest = blocks[ends[j - 1] - 1]
            for i in range(g - 1, j):
                count = ends[j - 1] - (ends[i - 1] if i else 0)
                cost = best[g - 1][i] + count * longest + GROUP_COST_BLOCKS
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    groups = min(range(1, MAX_DECODE_GROUPS + 1), key=lambda g: best[g][m])
    bounds, j = [], m
    for g in range(groups, 0, -1):
        i = cut[g][j]
        bounds.append((ends[i - 1] if i else 0, ends[j - 1]))
        j = i
    return bounds[::-1]
