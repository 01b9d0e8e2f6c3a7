"""Native CPU kernels: C compiled on this machine at first use, called through ctypes.

:class:`PagedAttentionKernel` (``paged_attention.c``) reads K and V in place in the pool;
:class:`LinearKernel` (``linear.c``) runs float32 linear layers at decode's few rows near the
memory bound; :class:`LayerOps` (``layer_ops.c``) a Llama layer's RMSNorm, RoPE and SiLU in
float32. Built at run time for ``-march=native`` (:mod:`engine.kernels.build`); without a C
compiler, ``auto`` keeps the torch path (:class:`engine.config.KernelChoice`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.kernels.build import KernelBuildError, load_library
from engine.kernels.layer_ops import LayerOps, load_layer_ops
from engine.kernels.linear import LinearKernel, load_linear

__all__ = [
    "KernelBuildError",
    "LayerOps",
    "LinearKernel",
    "PagedAttentionKernel",
    "load_layer_ops",
    "load_linear",
    "load_paged_attention",
]

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


@dataclass(frozen=True)
class PagedAttentionKernel:
    """``pd_paged_attention`` from :file:`paged_attention.c`, loaded.

    Paged attention over blocks scattered in the pool has no torch operator on CPU; in torch it
    takes a gather of every sequence's blocks per layer (a copy as large as the contexts) before
    attention reads them again. The kernel reads each K and V slot once, in place.
    """

    path: Path
    _fn: Callable[..., int]

    @staticmethod
    def supports(dtype: torch.dtype, device: torch.device) -> bool:
        return device.type == "cpu" and dtype in _DTYPES

    def __call__(
        self,
        query: torch.Tensor,  # (T, H, D), last dim contiguous
        out: torch.Tensor,  # (T, H, D) contiguous, written
        layer_kv: torch.Tensor,  # (2, NB, bs, KVH, D) contiguous: one layer of the pool
        block_table: torch.Tensor,  # (T, MB) int64 contiguous: row t holds token t's blocks
        context_len: torch.Tensor,  # (T,) int64: slots each token attends (1 .. MB * bs)
        scale: float,
    ) -> None:
        tokens, heads, head_dim = query.shape
        _, _, block_size, kv_heads, _ = layer_kv.shape
        if query.stride(2) != 1 or not out.is_contiguous() or not layer_kv.is_contiguous():
            raise ValueError("paged attention kernel needs contiguous rows")
        rc = self._fn(
            query.data_ptr(),
            query.stride(0),
            query.stride(1),
            out.data_ptr(),
            layer_kv[0].data_ptr(),
            layer_kv[1].data_ptr(),
            block_table.data_ptr(),
            block_table.shape[1],
            context_len.data_ptr(),
            tokens,
            heads,
            kv_heads,
            head_dim,
            block_size,
            scale,
            _DTYPES[query.dtype],
        )  # on as many threads as torch uses on the calling thread
        if rc != 0:
            raise ValueError(
                f"paged attention kernel refused its arguments (rc {rc}): heads {heads}, "
                f"kv heads {kv_heads}, head dim {head_dim}, block table {tuple(block_table.shape)}"
            )


def load_paged_attention(cache_dir: Path, compiler: str = "cc") -> PagedAttentionKernel:
    """Build (once per machine and source) and load the paged attention kernel.

    Raises :class:`KernelBuildError` when there is no compiler or the build fails."""
    path, lib = load_library("paged_attention.c", cache_dir, compiler)
    fn = lib.pd_paged_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR]
    fn.argtypes += [_I64] * 5 + [ctypes.c_float, ctypes.c_int]
    return PagedAttentionKernel(path, fn)
