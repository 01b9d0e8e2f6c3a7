"""Attention over the paged KV cache, plugged into transformers' attention interface.

The model runs on a *packed* batch: all new tokens of all scheduled sequences side by side as one
row ``(1, N)``, with explicit ``position_ids``. For each layer, this module

1. writes the new tokens' K and V into their cache slots (``slot_mapping``), then
2. gathers each sequence's whole context from its blocks (``context_slots``), padded to the
   longest context, and runs one batched scaled-dot-product attention with a mask that is causal
   within the new tokens and hides padding.

So sequences of different lengths, and prefill chunks next to decode tokens, share one forward
pass without padding the *model* inputs; only attention pads, and only up to the longest context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from engine.kv_cache import KVCache

ATTENTION_NAME = "pdserve_paged"


@dataclass(frozen=True)
class AttentionBatch:
    """Per-step attention metadata, built once by the model runner and shared by every layer.

    B sequences, N new tokens in all, Q = most new tokens of one sequence, C = longest context.
    """

    kv_cache: KVCache
    slot_mapping: torch.Tensor  # (N,) flat cache slot of each new token
    context_slots: torch.Tensor  # (B, C) flat slot of each context position; padding -> 0
    mask: torch.Tensor  # (B, 1, Q, C) True where a query may attend
    query_index: torch.Tensor | None  # (B, Q) index into the N new tokens; None when Q == 1
    output_index: torch.Tensor | None  # (N,) index into the flattened (B * Q) outputs


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
    slots = batch.kv_cache.layer_slots(layer_idx)  # (2, NB * bs, KVH, D)
    k_new = key[0].transpose(0, 1)  # (N, KVH, D)
    v_new = value[0].transpose(0, 1)
    slots[0].index_copy_(0, batch.slot_mapping, k_new)
    slots[1].index_copy_(0, batch.slot_mapping, v_new)

    k_ctx = slots[0][batch.context_slots].transpose(1, 2)  # (B, KVH, C, D)
    v_ctx = slots[1][batch.context_slots].transpose(1, 2)
    q = query[0].transpose(0, 1)  # (N, H, D)
    if batch.query_index is None:  # noqa: SIM108 - decode only: one query per sequence
        q_padded = q.unsqueeze(2)  # (B=N, H, 1, D)
    else:
        q_padded = q[batch.query_index].transpose(1, 2)  # (B, H, Q, D)
    out = F.scaled_dot_product_attention(
        q_padded, k_ctx, v_ctx, attn_mask=batch.mask, scale=scaling, enable_gqa=True
    )  # (B, H, Q, D)
    out = out.transpose(1, 2)  # (B, Q, H, D)
    if batch.output_index is None:
        return out.reshape(1, -1, out.shape[2], out.shape[3]), None  # (1, N, H, D)
    flat = out.reshape(-1, out.shape[2], out.shape[3])  # (B * Q, H, D)
    return flat[batch.output_index].unsqueeze(0), None


def register_paged_attention() -> str:
    """Make :func:`paged_attention` selectable as ``attn_implementation``; idempotent."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention)
    return ATTENTION_NAME
