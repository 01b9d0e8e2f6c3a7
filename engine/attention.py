"""Attention over the paged KV cache, plugged into transformers' attention interface.

The model runs on a *packed* batch: all new tokens of all scheduled sequences as one row with
explicit positions, decode tokens first and prefill chunks after (:class:`AttentionBatch`, built
once per step, shared by every layer). Per layer, :func:`attend` writes the new K and V into
their cache slots, then attends each token to its context. Only attention pads, and only within
a group, so a long prompt arriving does not pad every running sequence's single query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.attention_varlen import VarlenBatch, varlen_attend
from engine.kernels import PagedAttentionKernel
from engine.kv_cache import KVCache

ATTENTION_NAME = "pdserve_paged"


@dataclass(frozen=True)
class ContextGather:
    """Which blocks hold the contexts of B sequences, each padded to MB blocks.

    Q = most new tokens of one sequence in the group, C = MB * bs.
    """

    block_ids: torch.Tensor  # (B * MB,) block of each (sequence, block index); padding -> 0
    num_seqs: int  # B
    blocks_per_seq: int  # MB
    mask: torch.Tensor | None  # (B, 1, Q, C) additive: 0 where a query may attend, -inf where
    # not; None when every query sees every slot


@dataclass(frozen=True)
class DecodeGroup:
    """Sequences with one new token each: packed tokens ``[start, start + num_seqs)``."""

    start: int
    num_seqs: int
    context: ContextGather


@dataclass(frozen=True)
class NativeDecode:
    """Decode tokens ``[0, B)`` read their contexts in place with the native kernel: no gather,
    no padding, so no length groups either."""

    kernel: PagedAttentionKernel
    block_table: torch.Tensor  # (B, MB) int64, rows padded with block 0
    context_len: torch.Tensor  # (B,) int64: each sequence's context, its new token included


@dataclass(frozen=True)
class PrefillGroup:
    """Sequences with several new tokens: packed tokens ``[start, N)``, sequence by sequence."""

    start: int
    lengths: tuple[int, ...]  # new tokens of each sequence, in packed order
    context: ContextGather | None  # None: every sequence starts at position 0, so its context is
    # its own new tokens (one causal attention per sequence, no padding)
    query_index: torch.Tensor | None  # (B, Q) index into the group's tokens; None when B == 1
    output_index: torch.Tensor | None  # (T,) index into the flattened (B * Q) outputs


@dataclass(frozen=True)
class AttentionBatch:
    """Per-step attention metadata, built once by the model runner and shared by every layer."""

    kv_cache: KVCache
    slot_mapping: torch.Tensor  # (N,) flat cache slot of each new token
    decode: tuple[DecodeGroup, ...]  # in packed order, back to back from token 0
    prefill: PrefillGroup | None
    native: NativeDecode | None  # instead of ``decode`` groups: every decode token, from 0
    workspace: torch.Tensor  # (>= 2 * max(B * MB) * bs * KVH * D,) scratch for gathered K and V
    varlen: VarlenBatch | None = None  # CUDA: every token through one FlashAttention call
    # (:mod:`engine.attention_varlen`), instead of ``decode``, ``prefill`` and ``native``


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, H, N, D)
    key: torch.Tensor,  # (1, KVH, N, D)
    value: torch.Tensor,  # (1, KVH, N, D)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function; returns ``(1, N, H, D)``."""
    batch: AttentionBatch = kwargs["pdserve_batch"]
    layer_idx: int = module.layer_idx  # type: ignore[assignment]  # set by every HF attention
    head_dim = query.shape[-1]
    scale = scaling if scaling is not None else head_dim**-0.5
    return attend(batch, layer_idx, query[0], key[0], value[0], scale).unsqueeze(0), None


def attend(
    batch: AttentionBatch,
    layer_idx: int,
    q: torch.Tensor,  # (H, N, D), any strides with the last one 1
    k: torch.Tensor,  # (KVH, N, D)
    v: torch.Tensor,  # (KVH, N, D)
    scale: float,
) -> torch.Tensor:
    """Write the step's new K and V into their slots of layer ``layer_idx``, then attend every
    new token to its context: ``(N, H, D)``, contiguous.

    The runner packs sequences with one new token (decode) first, shortest context first, and
    those with several (prefill chunks) after them::

        packed tokens   [ d0 d1 d2 | d3 d4 ... | p0 p0 p0 p0 p1 p1 p1 ... ]
                          decode groups          prefill group (starts at Bd)

    - with ``batch.varlen`` (CUDA), all of them in one FlashAttention call over the pool;
    - decode tokens: with the native kernel (:mod:`engine.kernels`, CPU), all at once, each
      reading its context's blocks in place. Otherwise each decode group (similar context
      lengths, so padding stays small; a few groups at most) gathers its sequences' whole blocks
      into the workspace every layer reuses (:func:`_gather`), padded to the group's longest
      context, and runs one SDPA with one query per sequence and a key-padding mask;
    - prefill group: when every sequence starts at position 0 (fresh prompts), each attends
      causally to its own new tokens, one call per prompt: no gather, no padding, no mask.
      Otherwise as decode, with queries padded to the longest chunk and a causal mask over the
      gathered context.
    """
    cache = batch.kv_cache
    layer_kv = cache.kv[layer_idx]  # (2, NB, bs, KVH, D)
    slots = layer_kv.view(2, -1, cache.num_kv_heads, cache.head_dim)  # (2, NB * bs, KVH, D)
    slots[0].index_copy_(0, batch.slot_mapping, k.transpose(0, 1))  # (N, KVH, D) each
    slots[1].index_copy_(0, batch.slot_mapping, v.transpose(0, 1))
    if batch.varlen is not None:
        return varlen_attend(batch.varlen, layer_kv, q, scale)

    num_heads, num_tokens, head_dim = q.shape
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch.native is not None:
        native = batch.native
        count = native.context_len.numel()
        native.kernel(
            q[:, :count].transpose(0, 1),
            out[:count],
            layer_kv,
            native.block_table,
            native.context_len,
            scale,
        )
    for group in batch.decode:
        k_ctx, v_ctx = _gather(layer_kv, group.context, batch.workspace)  # (B, KVH, C, D)
        tokens = q[:, group.start : group.start + group.num_seqs]  # (H, B, D)
        q_dec = tokens.transpose(0, 1).unsqueeze(2)  # (B, H, 1, D)
        group_out = F.scaled_dot_product_attention(
            q_dec, k_ctx, v_ctx, attn_mask=group.context.mask, scale=scale, enable_gqa=True
        )  # (B, H, 1, D)
        out[group.start : group.start + group.num_seqs] = group_out.squeeze(2)
    if batch.prefill is not None:
        prefill = batch.prefill
        _prefill(prefill, layer_kv, q, k, v, batch.workspace, scale, out[prefill.start :])
    return out


def _prefill(
    group: PrefillGroup,
    layer_kv: torch.Tensor,  # (2, NB, bs, KVH, D)
    query: torch.Tensor,  # (H, N, D)
    key: torch.Tensor,  # (KVH, N, D)
    value: torch.Tensor,  # (KVH, N, D)
    workspace: torch.Tensor,
    scale: float,
    out: torch.Tensor,  # (T, H, D): written
) -> None:
    """Attention of the prefill group's T tokens, into ``out``."""
    if group.context is None:  # fresh prompts: each attends its own new tokens, causally
        offset = group.start
        for length in group.lengths:  # one call per prompt: no padding to the longest
            end = offset + length
            o = F.scaled_dot_product_attention(
                query[None, :, offset:end],
                key[None, :, offset:end],
                value[None, :, offset:end],
                is_causal=True,
                scale=scale,
                enable_gqa=True,
            )  # (1, H, n, D)
            out[offset - group.start : end - group.start] = o[0].transpose(0, 1)
            offset = end
        return
    q = query[:, group.start :].transpose(0, 1)  # (T, H, D)
    k_ctx, v_ctx = _gather(layer_kv, group.context, workspace)  # (B, KVH, C, D)
    o = F.scaled_dot_product_attention(
        _pad(q, group.query_index),
        k_ctx,
        v_ctx,
        attn_mask=group.context.mask,
        scale=scale,
        enable_gqa=True,
    ).transpose(1, 2)  # (B, Q, H, D)
    if group.output_index is None:
        out.copy_(o[0])
    else:
        out.copy_(o.reshape(-1, o.shape[2], o.shape[3])[group.output_index])


def _pad(tokens: torch.Tensor, query_index: torch.Tensor | None) -> torch.Tensor:
    """``(T, heads, D)`` packed tokens of B sequences -> ``(B, heads, Q, D)``, right-padded."""
    if query_index is None:
        return tokens.transpose(0, 1)[None]  # (1, heads, T, D)
    return tokens[query_index].transpose(1, 2)  # (B, heads, Q, D)


def _gather(
    layer_kv: torch.Tensor,  # (2, NB, bs, KVH, D)
    context: ContextGather,
    workspace: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the group's blocks of one layer into the workspace: K and V ``(B, KVH, C, D)``.

    Whole blocks are contiguous runs of ``bs * KVH * D`` elements, so this is one ``memcpy`` per
    block; K and V come back as transposed views (SDPA reads them strided)."""
    _, num_blocks, bs, kvh, d = layer_kv.shape
    row = bs * kvh * d
    count = context.block_ids.numel()
    out = workspace[: 2 * count * row].view(2, count, row)
    torch.index_select(layer_kv.view(2, num_blocks, row), 1, context.block_ids, out=out)
    ctx = out.view(2, context.num_seqs, context.blocks_per_seq * bs, kvh, d)  # (2, B, C, KVH, D)
    return ctx[0].transpose(1, 2), ctx[1].transpose(1, 2)


def register_paged_attention() -> str:
    """Make :func:`paged_attention` selectable as ``attn_implementation``; idempotent."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    return ATTENTION_NAME
