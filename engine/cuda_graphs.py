"""CUDA graphs for decode steps: which batch sizes get a graph, the static buffers a graph reads
its per-step metadata from, and capture / replay (``--no-cuda-graphs`` turns them off).

A decode step launches a few hundred small kernels; on a GPU their launch cost, not their
work, bounds a small batch. A CUDA graph replays the whole step's launches at once, but only
on the tensors it was captured with: so each *bucket* (a batch size) gets one graph, the step's
metadata is copied into fixed buffers before each replay, and a batch is padded up to the
smallest bucket that holds it::

    batch of 3 decode sequences  ->  bucket 4
    row:           0     1     2     3 (padding)
    input_ids     t0    t1    t2     0
    positions     p0    p1    p2     0
    slot_mapping  s0    s1    s2     padding_block * block_size
    block_tables  bt0   bt1   bt2    [padding_block] * max_blocks
    seq_lens      l0    l1    l2     1

Padding rows compute a throwaway token whose K and V land in the *padding block*: the KV
tensor's last block, which the :class:`~engine.block_pool.BlockPool` never hands out (it
belongs to no sequence, so writing it harms nothing; :func:`padding_blocks`), and attend to
that one slot (``seq_len`` 1: never an empty softmax).

Only pure-decode steps replay a graph (:func:`decode_metadata`): every item one new token, no
draft (a speculative item is several rows), no prompt exporting its KV layer by layer (a graph
cannot call back after each layer). Anything else, a batch larger than the largest bucket, a
bucket whose capture failed, and every step off CUDA run eagerly. The captured step is
:func:`varlen_decode_step` (the runner's Llama forward over varlen FlashAttention, whose
metadata all lives in device tensors); the gather fallback's metadata changes shape with the
batch's contexts, so it runs eagerly.

Nothing here touches a device at import; off CUDA (or with graphs turned off) no graph, stream
or graph memory pool is ever created and :meth:`DecodeGraphs.replay` says "run eagerly".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog
import torch
import torch.nn.functional as F

from engine.attention import AttentionBatch
from engine.attention_varlen import VarlenBatch, VarlenKernel
from engine.kv_cache import KVCache

if TYPE_CHECKING:
    from engine.scheduler import ScheduledBatch

__all__ = [
    "DEFAULT_BUCKETS",
    "DecodeGraphs",
    "DecodeMetadata",
    "DecodeTensors",
    "StaticDecodeBuffers",
    "choose_bucket",
    "decode_metadata",
    "graph_buckets",
    "padding_blocks",
    "varlen_decode_step",
]

log = structlog.get_logger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
"""Batch sizes captured by default: powers of two keep padding under half a batch, and seven
graphs keep capture at start short."""


def graph_buckets(
    max_num_seqs: int, candidates: Sequence[int] = DEFAULT_BUCKETS
) -> tuple[int, ...]:
    """The buckets worth capturing when batches hold at most ``max_num_seqs`` sequences: the
    candidates below it, and ``max_num_seqs`` itself when it falls short of the largest (so
    every batch the scheduler can form has a bucket), ascending."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be at least 1, not {max_num_seqs}")
    below = sorted({b for b in candidates if 1 <= b < max_num_seqs})
    top = max(candidates, default=0)
    return (*below, max_num_seqs) if max_num_seqs <= top else tuple(below)


def choose_bucket(buckets: Sequence[int], batch_size: int, has_prefill: bool) -> int | None:
    """The smallest bucket that holds ``batch_size`` decode sequences (``buckets``
    ascending); None (run eagerly) for a batch with prefill work, an empty batch, or one
    above the largest bucket."""
    if has_prefill or batch_size < 1:
        return None
    return next((b for b in buckets if b >= batch_size), None)


def padding_blocks(enabled: bool, device: torch.device) -> int:
    """Blocks the KV tensor holds beyond the pool for graphs' padding rows: 1 on CUDA with
    graphs on (the tensor's last block, the :class:`StaticDecodeBuffers` ``padding_block``),
    else 0 (the pool is the whole tensor, as it always is on CPU)."""
    return 1 if enabled and device.type == "cuda" else 0


class DecodeMetadata(NamedTuple):
    """One decode step's inputs, one row per sequence (plain host data from the runner)."""

    input_ids: Sequence[int]  # the token each sequence feeds
    positions: Sequence[int]  # its position
    slot_mapping: Sequence[int]  # the flat cache slot its K and V are written to
    block_tables: Sequence[Sequence[int]]  # its blocks, in order
    seq_lens: Sequence[int]  # tokens it attends to (including this one)


class DecodeTensors(NamedTuple):
    """The first ``bucket`` rows of :class:`StaticDecodeBuffers` (views, not copies): what a
    captured step reads."""

    input_ids: torch.Tensor  # (bucket,) int64
    positions: torch.Tensor  # (bucket,) int64
    slot_mapping: torch.Tensor  # (bucket,) int64
    block_tables: torch.Tensor  # (bucket, max_blocks) int32
    seq_lens: torch.Tensor  # (bucket,) int32


class StaticDecodeBuffers:
    """The fixed tensors a captured decode step reads, sized for ``max_batch`` rows and
    ``max_blocks`` blocks per sequence, on ``device``; :meth:`fill` copies a step's metadata
    into their first rows in place and pads the rest (see the module's table).

    ``padding_block`` must be a block no sequence is ever given: padding rows write into it.
    ``input_ids``, ``positions`` and ``slot_mapping`` are int64 (as the eager runner's);
    ``block_tables`` and ``seq_lens`` int32 (as paged-attention kernels take them)."""

    def __init__(
        self,
        max_batch: int,
        max_blocks: int,
        block_size: int,
        padding_block: int,
        device: torch.device,
    ) -> None:
        if max_batch < 1 or max_blocks < 1 or block_size < 1 or padding_block < 0:
            raise ValueError("sizes must be positive and padding_block a block id")
        self.max_batch = max_batch
        self.max_blocks = max_blocks
        self.padding_block = padding_block
        self.padding_slot = padding_block * block_size
        self.device = device
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)  # (B,)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)  # (B,)
        self.slot_mapping = torch.zeros(max_batch, dtype=torch.long, device=device)  # (B,)
        self.block_tables = torch.zeros(
            (max_batch, max_blocks), dtype=torch.int32, device=device
        )  # (B, M)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)  # (B,)

    def fits(self, meta: DecodeMetadata) -> bool:
        """Whether ``meta`` fits these buffers (rows and blocks per sequence)."""
        rows = len(meta.input_ids)
        return rows <= self.max_batch and all(len(t) <= self.max_blocks for t in meta.block_tables)

    def fill(self, meta: DecodeMetadata, bucket: int) -> DecodeTensors:
        """Copy ``meta`` into rows ``[0, n)`` and padding into ``[n, bucket)``; returns the
        buffers' first ``bucket`` rows (views: a graph captured on them sees the new values).
        ValueError when ``meta`` does not fit or its fields disagree in length."""
        rows = len(meta.input_ids)
        lengths = {len(meta.positions), len(meta.slot_mapping), len(meta.block_tables)}
        if lengths | {len(meta.seq_lens)} != {rows}:
            raise ValueError("decode metadata fields differ in length")
        if not rows <= bucket <= self.max_batch or not self.fits(meta):
            raise ValueError(f"{rows} rows do not fit bucket {bucket} of these buffers")
        pad = bucket - rows
        tables = [
            [*t, *[self.padding_block] * (self.max_blocks - len(t))] for t in meta.block_tables
        ]
        tables += [[self.padding_block] * self.max_blocks] * pad
        self._copy(self.input_ids, [*meta.input_ids, *[0] * pad])
        self._copy(self.positions, [*meta.positions, *[0] * pad])
        self._copy(self.slot_mapping, [*meta.slot_mapping, *[self.padding_slot] * pad])
        self._copy(self.block_tables, tables)
        self._copy(self.seq_lens, [*meta.seq_lens, *[1] * pad])
        return self.view(bucket)

    def view(self, bucket: int) -> DecodeTensors:
        """The first ``bucket`` rows of each buffer (views, not copies)."""
        return DecodeTensors(
            self.input_ids[:bucket],
            self.positions[:bucket],
            self.slot_mapping[:bucket],
            self.block_tables[:bucket],
            self.seq_lens[:bucket],
        )

    @staticmethod
    def _copy(target: torch.Tensor, values: Sequence[object]) -> None:
        host = torch.tensor(values, dtype=target.dtype)
        target[: host.shape[0]].copy_(host, non_blocking=True)


EMPTY = DecodeMetadata((), (), (), (), ())


def decode_metadata(batch: ScheduledBatch, block_size: int) -> DecodeMetadata | None:
    """A pure-decode batch's rows in the packed order of :mod:`engine.step_inputs` (shortest
    context first, ties in batch order), so row k's logits are packed token k's; None when
    any item is not one plain decode token (see the module's docstring)."""
    items = batch.items
    if not items or any(i.num_new_tokens != 1 or i.draft or i.seq.export_kv for i in items):
        return None
    rows = sorted(items, key=lambda item: item.seq.num_computed_tokens)  # stable
    bs = block_size
    ids, positions, slots, tables, lens = [], [], [], [], []
    for item in rows:
        seq, p = item.seq, item.seq.num_computed_tokens
        table = seq.block_table[: p // bs + 1]  # the blocks its context covers
        ids.append(seq.token_ids[p])
        positions.append(p)
        slots.append(table[p // bs] * bs + p % bs)
        tables.append(table)
        lens.append(p + 1)
    return DecodeMetadata(ids, positions, slots, tables, lens)


DecodeStep = Callable[[DecodeTensors], torch.Tensor]
"""A decode step over static buffers' views: returns a tensor with one row per (padded)
sequence, e.g. the logits ``(bucket, vocab)``. It must read its inputs only from the views it
is given and allocate nothing that outlives the step (what CUDA graph capture requires)."""

DecodeForward = Callable[[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor], torch.Tensor]
"""``(input_ids (B,), positions (B,), batch, logits_index (S,)) -> logits (S, V)``: the
runner's :class:`~engine.llama_forward.LlamaForward`."""


def varlen_decode_step(
    forward: DecodeForward, kv_cache: KVCache, kernel: VarlenKernel, max_context: int
) -> DecodeStep:
    """The decode step a graph captures: ``forward`` over :class:`DecodeTensors`, attention
    through varlen FlashAttention whose metadata is computed on the device from the buffers
    (one query per row; the kernel is told ``max_context``, the longest context a row of
    the buffers holds, and reads each row's own length from ``seq_lens``). Logits for
    every row, padding included: ``(bucket, V)``."""

    def step(t: DecodeTensors) -> torch.Tensor:
        rows, dev = t.input_ids.shape[0], t.input_ids.device
        varlen = VarlenBatch(
            kernel=kernel,
            cu_seq_q=torch.arange(rows + 1, dtype=torch.int32, device=dev),  # (B + 1,)
            cu_seq_k=F.pad(torch.cumsum(t.seq_lens, 0, dtype=torch.int32), (1, 0)),  # (B + 1,)
            seqused_k=t.seq_lens,  # (B,)
            block_table=t.block_tables,  # (B, M)
            max_q=1,
            max_k=max_context,
        )
        batch = AttentionBatch(
            kv_cache=kv_cache,
            slot_mapping=t.slot_mapping,
            decode=(),
            prefill=None,
            native=None,
            workspace=torch.empty(0, dtype=kv_cache.dtype, device=dev),
            varlen=varlen,
        )
        return forward(t.input_ids, t.positions, batch, torch.arange(rows, device=dev))

    return step


class Captured(NamedTuple):
    """One bucket's graph and the output tensor each of its replays writes."""

    graph: Any  # torch.cuda.CUDAGraph (anything with ``replay()``)
    output: torch.Tensor


class DecodeGraphs:
    """One CUDA graph of ``step`` per bucket, captured on :class:`StaticDecodeBuffers`.

    Usable only where :meth:`available`: graphs turned on, buffers on a CUDA device and CUDA
    present. Elsewhere :meth:`capture` does nothing and :meth:`replay` returns None (run the
    step eagerly), and nothing graph-related is created. A replay's output is the graph's own
    tensor: read (or copy) it before the next replay of the same bucket overwrites it."""

    def __init__(
        self, buffers: StaticDecodeBuffers, buckets: Sequence[int], enabled: bool = True
    ) -> None:
        self.buffers = buffers
        self.buckets = tuple(sorted(b for b in buckets if b <= buffers.max_batch))
        self.enabled = enabled
        self._graphs: dict[int, Captured] = {}
        self._pool: Any = None  # the graph memory pool all buckets share, made at capture

    def available(self) -> bool:
        return self.enabled and self.buffers.device.type == "cuda" and torch.cuda.is_available()

    @property
    def captured(self) -> tuple[int, ...]:
        """The buckets that have a graph."""
        return tuple(sorted(self._graphs))

    @torch.inference_mode()
    def capture(self, step: DecodeStep, warmup: int = 2) -> None:
        """Capture ``step`` once per bucket, largest first. A bucket whose capture raises is
        logged (``cuda_graph_capture_failed``) and left without a graph: its batches run
        eagerly. The buffers hold only padding meanwhile, so capture writes K and V into the
        padding block alone."""
        if not self.available():
            return
        for bucket in reversed(self.buckets):
            inputs = self.buffers.fill(EMPTY, bucket)
            try:
                self._graphs[bucket] = self._capture_bucket(step, inputs, warmup)
            except Exception as exc:  # that bucket runs eagerly; serving goes on
                log.warning(
                    "cuda_graph_capture_failed", bucket=bucket, error=f"{type(exc).__name__}: {exc}"
                )
        log.info("cuda_graphs_captured", buckets=list(self.captured))

    def _capture_bucket(self, step: DecodeStep, inputs: DecodeTensors, warmup: int) -> Captured:
        """One graph: ``warmup`` eager runs on a side stream first, as torch requires (lazy
        initialisation and autotuning must not happen inside capture), then the capture,
        in the memory pool the buckets share."""
        device = self.buffers.device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = step(inputs)
        return Captured(graph, output)

    def replay(self, meta: DecodeMetadata, has_prefill: bool = False) -> torch.Tensor | None:
        """The step's output for ``meta``'s rows, from the bucket's graph; None when this
        batch must run eagerly (prefill work, too many rows or blocks, no graph for its
        bucket)."""
        bucket = choose_bucket(self.buckets, len(meta.input_ids), has_prefill)
        if bucket is None or bucket not in self._graphs or not self.buffers.fits(meta):
            return None
        captured = self._graphs[bucket]
        self.buffers.fill(meta, bucket)
        captured.graph.replay()
        return captured.output[: len(meta.input_ids)]
