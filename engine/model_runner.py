"""Turns a :class:`ScheduledBatch` into tensors, runs one forward pass, and samples.

The batch is packed: the new tokens of all sequences form one row ``(1, N)``; attention finds each
sequence's context through its block table (see :mod:`engine.attention`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from engine.attention import AttentionBatch
from engine.kv_cache import KVCache
from engine.sampler import Sampler, SampleRequest
from engine.scheduler import ScheduledBatch


class ModelInputs(NamedTuple):
    input_ids: torch.Tensor  # (1, N)
    position_ids: torch.Tensor  # (1, N)
    attention: AttentionBatch
    logits_index: torch.Tensor  # (S,) packed index of each sampled sequence's last new token
    sample_requests: list[SampleRequest]


LayerListener = Callable[[int], None]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, sampler: Sampler) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sampler = sampler
        self.device = kv_cache.device
        self.layer_listener: LayerListener | None = None
        """Called with a layer index as soon as that layer's KV is in the cache (during
        :meth:`execute`); the engine sets it for steps that stream KV out layer by layer."""

    def install_layer_hooks(self) -> None:
        """Hook every attention module so :attr:`layer_listener` hears each finished layer."""
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
        inputs = self.prepare(batch)
        out = self.model(
            input_ids=inputs.input_ids,
            position_ids=inputs.position_ids,
            use_cache=False,
            logits_to_keep=inputs.logits_index,
            pdserve_batch=inputs.attention,
        )
        logits = out.logits[0]  # (S, V)
        tokens = self.sampler.sample(logits, inputs.sample_requests) if len(logits) else []
        result = [0] * len(batch.items)
        sampled_rows = (i for i, item in enumerate(batch.items) if item.sample)
        for row, token in zip(sampled_rows, tokens, strict=True):
            result[row] = token
        return result

    def prepare(self, batch: ScheduledBatch) -> ModelInputs:
        bs = self.kv_cache.block_size
        starts = [item.seq.num_computed_tokens for item in batch.items]
        lengths = [item.num_new_tokens for item in batch.items]
        input_ids: list[int] = []
        for item, start in zip(batch.items, starts, strict=True):
            input_ids.extend(item.seq.token_ids[start : start + item.num_new_tokens])
        num_seqs = len(batch.items)
        max_q = max(lengths)
        max_ctx = max(s + n for s, n in zip(starts, lengths, strict=True))
        max_blocks = -(-max_ctx // bs)
        table = torch.zeros((num_seqs, max_blocks), dtype=torch.long)  # (B, MB)
        for row, item in enumerate(batch.items):
            blocks = item.seq.block_table[:max_blocks]
            table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        start_t = torch.tensor(starts, dtype=torch.long)  # (B,)
        length_t = torch.tensor(lengths, dtype=torch.long)  # (B,)
        ctx_pos = torch.arange(max_ctx)  # (C,)
        context_slots = table[:, ctx_pos // bs] * bs + ctx_pos % bs  # (B, C)
        q_off = torch.arange(max_q)  # (Q,)
        q_valid = q_off[None, :] < length_t[:, None]  # (B, Q)
        q_pos = start_t[:, None] + q_off[None, :]  # (B, Q) absolute position of each query
        mask = ctx_pos[None, None, :] <= q_pos[:, :, None]  # (B, Q, C) causal over the context
        mask &= q_valid[:, :, None]
        mask[:, :, 0] |= ~q_valid  # padded query rows attend one slot: no all-masked rows
        slot_mapping = context_slots.gather(1, q_pos.clamp(max=max_ctx - 1))[q_valid]  # (N,)
        positions = q_pos[q_valid]  # (N,) in packed order: sequence by sequence
        offsets = torch.cumsum(length_t, 0) - length_t  # (B,) packed index of each first token
        if max_q == 1:
            query_index = output_index = None
        else:
            query_index = (offsets[:, None] + q_off[None, :]).masked_fill(~q_valid, 0)  # (B, Q)
            output_index = (torch.arange(num_seqs)[:, None] * max_q + q_off[None, :])[q_valid]
        sample_rows = [i for i, item in enumerate(batch.items) if item.sample]
        logits_index = (offsets + length_t - 1)[sample_rows]  # (S,)
        dev = self.device
        attention = AttentionBatch(
            kv_cache=self.kv_cache,
            slot_mapping=slot_mapping.to(dev),
            context_slots=context_slots.to(dev),
            mask=mask.unsqueeze(1).to(dev),  # (B, 1, Q, C)
            query_index=None if query_index is None else query_index.to(dev),
            output_index=None if output_index is None else output_index.to(dev),
        )
        requests = [
            SampleRequest(batch.items[i].seq.sampling, batch.items[i].seq.num_tokens)
            for i in sample_rows
        ]
        return ModelInputs(
            input_ids=torch.tensor([input_ids], dtype=torch.long, device=dev),
            position_ids=positions.unsqueeze(0).to(dev),
            attention=attention,
            logits_index=logits_index.to(dev),
            sample_requests=requests,
        )


def _is_attention(module: torch.nn.Module) -> bool:
    """transformers' self-attention modules carry their ``layer_idx`` (and write the KV)."""
    return type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx")
