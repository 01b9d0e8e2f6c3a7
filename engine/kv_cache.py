"""The paged KV tensor: every layer's K and V for every block, in one allocation.

Layout::

    kv[layer, k_or_v, block, slot, kv_head, head_dim]      (L, 2, NB, bs, KVH, D)

A token at position ``p`` of a sequence lives in slot ``p % bs`` of block ``block_table[p // bs]``,
i.e. at flat slot ``block_table[p // bs] * bs + p % bs`` of ``kv[layer, k_or_v]`` viewed as
``(NB * bs, KVH, D)``.
A page on the wire is ``kv[l0:l1, :, block_ids]``: the layers' K and V for some blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.model_files import ModelSpec


class KVCache:
    """Owns the KV tensor. Which blocks belong to whom is the :class:`BlockPool`'s business."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        # (L, 2, NB, bs, KVH, D)
        self.kv = torch.zeros(
            (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim),
            dtype=dtype,
            device=device,
        )
        self._bytes: memoryview | None = None  # the whole CPU pool as bytes, made on first use

    @classmethod
    def for_model(
        cls, spec: ModelSpec, num_blocks: int, block_size: int, like: torch.Tensor
    ) -> KVCache:
        """A cache for ``spec``'s layers on ``like``'s device and dtype (its weights')."""
        return cls(
            spec.num_layers,
            num_blocks,
            block_size,
            spec.num_kv_heads,
            spec.head_dim,
            like.dtype,
            like.device,
        )

    @staticmethod
    def token_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
        """KV bytes one token of ``spec`` takes (every layer's K and V)."""
        return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.kv[:, :, 0].numel() * self.kv.element_size()

    def page_shape(self, num_layers: int, num_blocks: int) -> tuple[int, ...]:
        return (num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def layer_slots(self, layer: int) -> torch.Tensor:
        """K and V of one layer as flat slots: (2, NB * bs, KVH, D), a view."""
        return self.kv[layer].view(2, self.num_blocks * self.block_size, self.num_kv_heads, -1)

    def gather_pages(self, block_ids: Sequence[int], layers: slice = slice(None)) -> torch.Tensor:
        """Copy some blocks' K and V out: (L', 2, n, bs, KVH, D), contiguous, on the cache's
        device."""
        runs = block_runs(block_ids)
        if len(runs) == 1:  # one slice copy is twice as fast as a gather
            _, first, count = runs[0]
            return self.kv[layers, :, first : first + count].clone()
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        return self.kv[layers].index_select(2, index)

    def scatter_pages(
        self, block_ids: Sequence[int], pages: torch.Tensor, layers: slice = slice(None)
    ) -> None:
        """Write pages (L', 2, n, bs, KVH, D) into the given blocks of the given layers."""
        pages = pages.to(self.device, non_blocking=True)
        runs = block_runs(block_ids)
        if len(runs) <= _MAX_RUNS:  # consecutive ids: slice copies (2x a scatter's speed)
            target = self.kv[layers]
            for offset, first, count in runs:
                target[:, :, first : first + count].copy_(pages[:, :, offset : offset + count])
            return
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
        self.kv[layers].index_copy_(2, index, pages)

    def page_views(self, block_ids: Sequence[int], layers: slice) -> list[memoryview]:
        """CPU pools: the pool memory a page for these blocks and layers is written into, as
        writable byte views in the page's byte order ``(L', 2, n, ...)``: one per layer, K/V
        and run of consecutive block ids. A payload read into them in turn lands where
        :meth:`scatter_pages` would copy it. (Plain offset arithmetic over one view of the
        whole pool: a tensor view per piece costs ~10 us each.)"""
        if self._bytes is None:
            if self.device.type != "cpu":
                raise ValueError("page_views needs a CPU pool")
            self._bytes = memoryview(self.kv.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
        block_bytes = self.block_size * self.num_kv_heads * self.head_dim * self.kv.element_size()
        runs = block_runs(block_ids)
        views = []
        for layer in range(*layers.indices(self.num_layers)):
            for kv_index in (0, 1):
                row = (layer * 2 + kv_index) * self.num_blocks
                for _, first, count in runs:
                    start = (row + first) * block_bytes
                    views.append(self._bytes[start : start + count * block_bytes])
        return views


_MAX_RUNS = 8


def block_runs(block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(offset in block_ids, first block id, length)`` of each run of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for offset, block_id in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == block_id:
            start, first, count = runs[-1]
            runs[-1] = (start, first, count + 1)
        else:
            runs.append((offset, block_id, 1))
    return runs
