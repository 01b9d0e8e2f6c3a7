"""Turns a :class:`ScheduledBatch` into tensors, runs one forward pass, and samples.

The batch is packed: the new tokens of all sequences form one row ``(1, N)``, decode tokens (one
per sequence) first, then prefill chunks; attention finds each sequence's context through its
block table (see :mod:`engine.attention`). When sampled rows carry a grammar, their
allowed-token mask is computed on a helper thread during the forward pass and applied before
sampling (see :mod:`engine.structured`); batches without one pay nothing for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import structlog
import torch

from core.sampling import TokenLogprob
from engine import llama_forward
from engine.attention import (
    AttentionBatch,
    ContextGather,
    DecodeGroup,
    NativeDecode,
    PrefillGroup,
)
from engine.attention_varlen import SeqSpan, VarlenBatch, VarlenKernel, build_varlen_batch
from engine.kernels import LayerOps, LinearKernel, PagedAttentionKernel
from engine.kernels.quant_linear import QuantLinearKernel
from engine.kv_cache import KVCache
from engine.linear import pack_linear, pack_linear_layers
from engine.llama_forward import LlamaForward
from engine.quantized_weights import FLOAT_PLAN, WeightPlan
from engine.sampler import Sampler, SampleRequest
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence as EngineSequence
from engine.structured import GrammarManager, PendingMask

log = structlog.get_logger(__name__)


class ModelInputs(NamedTuple):
    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N)
    attention: AttentionBatch
    logits_index: torch.Tensor  # (S,) packed index of each sampled sequence's last new token
    sample_requests: list[SampleRequest]
    sample_items: list[int]  # (S,) index in ``batch.items`` of each sampled row


LayerListener = Callable[[int], None]


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        sampler: Sampler,
        kernel: PagedAttentionKernel | None = None,
        linear: LinearKernel | None = None,
        layer_ops: LayerOps | None = None,
        grammars: GrammarManager | None = None,
        weights: WeightPlan = FLOAT_PLAN,
        quant: QuantLinearKernel | None = None,
        varlen: VarlenKernel | None = None,
    ) -> None:
        """Takes the model over: Llama-family models run through :class:`LlamaForward` (fused
        projections, no per-step module overhead), others through transformers with
        :func:`paged_attention`; on CPU the float32 linear layers run from weights packed once,
        through the ``linear`` kernel or else oneDNN (see :mod:`engine.linear`), and Llama-family
        norms, RoPE and SiLU through ``layer_ops`` when given. With ``kernel``, decode tokens
        attend through it (see :mod:`engine.kernels`). ``grammars`` masks the rows of
        sequences with a structured-output constraint (required to run any). ``weights`` says
        which layers compute from quantized blocks, through ``quant``
        (:mod:`engine.quantized_weights`). With ``varlen`` (CUDA), every token attends through
        it in one call per layer instead (:mod:`engine.attention_varlen`)."""
        self.model = model
        self.varlen = varlen
        self.weights = weights
        self.grammars = grammars
        self.kernel = kernel
        self.fast: LlamaForward | None = None
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.device = kv_cache.device
        self.layer_listener: LayerListener | None = None
        """Called with a layer index as soon as that layer's KV is in the cache (during
        :meth:`execute`); the engine sets it for steps that stream KV out layer by layer."""
        self._workspace = torch.empty(0, dtype=kv_cache.dtype, device=self.device)
        if isinstance(model, torch.nn.Module):

            def pack(layer: torch.nn.Module) -> torch.nn.Module:
                blocks = weights.quantized(layer) if quant is not None else None
                return pack_linear(layer, linear, blocks, quant)

            if llama_forward.supports(model):
                self.fast = LlamaForward(model, pack, layer_ops)
            else:
                pack_linear_layers(model, linear, weights.quantized, quant)

    def install_layer_hooks(self) -> None:
        """Hook every attention module so :attr:`layer_listener` hears each finished layer
        (transformers path; :class:`LlamaForward` calls the listener itself)."""
        if self.fast is not None:
            return
        layers = [m for m in self.model.modules() if _is_attention(m)]
        if len(layers) != self.kv_cache.num_layers:
            raise ValueError(
                f"found {len(layers)} attention modules, expected {self.kv_cache.num_layers}"
            )
        for module in layers:
            module.register_forward_hook(self._after_attention)

    def _after_attention(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self.layer_listener is not None:
            self.layer_listener(int(module.layer_idx))  # type: ignore[arg-type]

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[int]:
        """Run the batch; returns one token per item (0 for items that do not sample)."""
        return self.execute_with_logprobs(batch)[0]

    @torch.inference_mode()
    def execute_with_logprobs(
        self, batch: ScheduledBatch
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """As :meth:`execute`, with each item's logprobs (None: not sampled or not asked). An
        item whose row could not be sampled gets a negative token (see
        :data:`engine.sampler.SAMPLING_FAILURES`), which fails that sequence alone."""
        inputs = self.prepare(batch)
        pending = self._start_masks(batch, inputs.sample_items)  # runs during the forward
        try:
            logits = self._forward(inputs)  # (S, V)
        finally:  # joined even when the forward fails: the helper touches the batch's matchers
            mask = pending.wait() if pending is not None else None
        tokens: list[int] = []
        logprobs: list[TokenLogprob | None] = []
        if len(logits):
            tokens, logprobs = self.sampler.sample_with_logprobs(
                logits, inputs.sample_requests, mask
            )
        result = [0] * len(batch.items)
        result_lp: list[TokenLogprob | None] = [None] * len(batch.items)
        for row, token, lp in zip(inputs.sample_items, tokens, logprobs, strict=True):
            result[row] = token
            result_lp[row] = lp
            if token < 0:
                log.warning(
                    "sampling_failed", request_id=batch.items[row].seq.request_id, code=token
                )
        return result, result_lp

    def _forward(self, inputs: ModelInputs) -> torch.Tensor:
        """The logits ``(S, V)`` of the sampled rows."""
        if self.fast is not None:
            return self.fast(
                inputs.input_ids[0],
                inputs.position_ids[0],
                inputs.attention,
                inputs.logits_index,
                self.layer_listener,
            )
        out = self.model(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            use_cache=False,
            logits_to_keep=inputs.logits_index,
            pdserve_batch=inputs.attention,
        )
        return out.logits[0]

    def _start_masks(self, batch: ScheduledBatch, sample_items: list[int]) -> PendingMask | None:
        """Start the sampled rows' grammar masks (None when no row is constrained)."""
        seqs = [batch.items[i].seq for i in sample_items]
        if all(seq.sampling.structured is None for seq in seqs):
            return None
        if self.grammars is None:
            raise RuntimeError("a constrained sequence reached a runner without grammars")
        for seq in seqs:
            self.grammars.attach(seq)
        return self.grammars.start_masks(
            [seq.grammar for seq in seqs], [(seq.token_ids, seq.output_start) for seq in seqs]
        )

    def prepare(self, batch: ScheduledBatch) -> ModelInputs:
        bs = self.kv_cache.block_size
        order = [i for i, item in enumerate(batch.items) if item.num_new_tokens == 1]
        order.sort(key=lambda i: batch.items[i].seq.num_computed_tokens)  # stable
        num_decode = len(order)
        order += [i for i, item in enumerate(batch.items) if item.num_new_tokens > 1]
        items = [batch.items[i] for i in order]  # packed order: decode by context, then prefill
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        last_index: list[int] = []  # packed index of each item's last new token
        for item in items:
            seq, start, count = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
            table = seq.block_table
            input_ids.extend(seq.token_ids[start : start + count])
            positions.extend(range(start, start + count))
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, start + count))
            last_index.append(len(positions) - 1)
        native = None
        decode: tuple[DecodeGroup, ...] = ()
        prefill = None
        varlen = None
        if self.varlen is not None and items:
            varlen = self._varlen_batch(self.varlen, items)
        elif self.kernel is not None and num_decode:
            native = self._native_decode(self.kernel, items[:num_decode])
        else:
            decode = tuple(
                DecodeGroup(start, end - start, self._context(items[start:end], query_len=1))
                for start, end in split_by_length(
                    [-(-(item.seq.num_computed_tokens + 1) // bs) for item in items[:num_decode]]
                )
            )
        if varlen is None and num_decode < len(items):
            prefill = self._prefill_group(items[num_decode:], start=num_decode)
        sampled = [k for k, item in enumerate(items) if item.sample]
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
            logits_index=torch.tensor(
                [last_index[k] for k in sampled], dtype=torch.long, device=dev
            ),
            sample_requests=[sample_request(items[k].seq) for k in sampled],
            sample_items=[order[k] for k in sampled],
        )

    def _varlen_batch(self, kernel: VarlenKernel, items: Sequence[ScheduledSeq]) -> VarlenBatch:
        spans = [
            SeqSpan(item.seq.num_computed_tokens, item.num_new_tokens, item.seq.block_table)
            for item in items
        ]
        return build_varlen_batch(spans, self.kv_cache.block_size, self.device, kernel)

    def _native_decode(
        self, kernel: PagedAttentionKernel, items: Sequence[ScheduledSeq]
    ) -> NativeDecode:
        bs = self.kv_cache.block_size
        lengths = [item.seq.num_computed_tokens + 1 for item in items]
        max_blocks = -(-max(lengths) // bs)
        table = _padded_block_tables(items, max_blocks)
        dev = self.device
        return NativeDecode(
            kernel=kernel,
            block_table=torch.tensor(table, dtype=torch.long, device=dev).view(len(items), -1),
            context_len=torch.tensor(lengths, dtype=torch.long, device=dev),
        )

    def _prefill_group(self, items: Sequence[ScheduledSeq], start: int) -> PrefillGroup:
        """Sequences with several new tokens, packed from ``start`` on."""
        fresh = all(item.seq.num_computed_tokens == 0 for item in items)
        lengths = [item.num_new_tokens for item in items]
        if fresh:  # each prompt attends its own tokens: no context, no padding
            return PrefillGroup(start, tuple(lengths), None, None, None)
        max_q = max(lengths)
        context = self._context(items, query_len=max_q)
        if len(items) == 1:
            return PrefillGroup(start, tuple(lengths), context, None, None)
        length_t = torch.tensor(lengths)  # (B,)
        q_off = torch.arange(max_q)  # (Q,)
        q_valid = q_off[None, :] < length_t[:, None]  # (B, Q)
        offsets = torch.cumsum(length_t, 0) - length_t  # (B,) group index of each first token
        query_index = (offsets[:, None] + q_off[None, :]).masked_fill(~q_valid, 0)  # (B, Q)
        output_index = (torch.arange(len(items))[:, None] * max_q + q_off[None, :])[q_valid]
        dev = self.device
        return PrefillGroup(
            start, tuple(lengths), context, query_index.to(dev), output_index.to(dev)
        )

    def _context(self, items: Sequence[ScheduledSeq], query_len: int) -> ContextGather:
        """Block ids and mask for items whose queries are padded to ``query_len``."""
        bs = self.kv_cache.block_size
        starts = [item.seq.num_computed_tokens for item in items]
        ends = [s + item.num_new_tokens for s, item in zip(starts, items, strict=True)]
        max_blocks = -(-max(ends) // bs)
        block_ids = _padded_block_tables(items, max_blocks)
        dev = self.device
        context_len = max_blocks * bs
        mask = None
        if query_len > 1 or min(ends) < context_len:
            mask = self._mask(starts, ends, query_len, context_len)
        return ContextGather(
            block_ids=torch.tensor(block_ids, dtype=torch.long, device=dev),
            num_seqs=len(items),
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


def sample_request(seq: EngineSequence) -> SampleRequest:
    """What the sampler needs of ``seq``: its token ids by reference (read only by penalties)."""
    return SampleRequest(
        seq.sampling, seq.num_tokens, seq.token_ids, seq.output_start, seq.eos_token_ids
    )


def _padded_block_tables(items: Sequence[ScheduledSeq], max_blocks: int) -> list[int]:
    """The items' block tables, each cut or padded (with block 0) to ``max_blocks``, flat."""
    flat: list[int] = []
    for item in items:
        row = item.seq.block_table[:max_blocks]
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


def _is_attention(module: torch.nn.Module) -> bool:
    """transformers' self-attention modules carry their ``layer_idx`` (and write the KV)."""
    return type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx")
