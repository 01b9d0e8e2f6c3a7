"""``layer_ops.c`` loaded: a decoder layer's small float32 operations, one call each (CPU)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.kernels.build import load_library, rows_apart

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_F32 = ctypes.c_float


def _rows(t: torch.Tensor, what: str) -> None:
    """Float32 CPU rows, unit stride along a row, rows apart (no overlap)."""
    if t.dim() != 2 or t.dtype != torch.float32 or t.device.type != "cpu" or not rows_apart(t):
        raise ValueError(
            f"{what}: float32 CPU rows with unit stride that do not overlap needed, got "
            f"{t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}"
        )


@dataclass(frozen=True)
class LayerOps:
    """RMSNorm (with the residual add before it), RoPE and SiLU-times-up of Llama-family
    layers, as :mod:`engine.llama_forward` runs them on CPU in float32."""

    path: Path
    _add_rms_norm: Callable[..., None]
    _rope: Callable[..., None]
    _silu_mul: Callable[..., None]

    @staticmethod
    def supports(dtype: torch.dtype, device: torch.device) -> bool:
        return device.type == "cpu" and dtype == torch.float32

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """``x += delta`` in place (when given), then RMSNorm of ``x`` (rows, dim) into a new
        tensor."""
        _rows(x, "rms norm input")
        rows, dim = x.shape
        if delta is not None:
            _rows(delta, "residual delta")
            if delta.shape != x.shape:
                raise ValueError(f"delta {tuple(delta.shape)} does not match {tuple(x.shape)}")
        if weight.shape != (dim,) or not weight.is_contiguous():
            raise ValueError(f"norm weight {tuple(weight.shape)} does not fit rows of {dim}")
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"norm weight is {weight.dtype} on {weight.device}, not float32 CPU")
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        self._add_rms_norm(
            x.data_ptr(),
            x.stride(0),
            None if delta is None else delta.data_ptr(),
            0 if delta is None else delta.stride(0),
            weight.data_ptr(),
            eps,
            out.data_ptr(),
            out.stride(0),
            rows,
            dim,
        )
        return out

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (rows, heads, head_dim; heads and head_dim contiguous) in place by
        ``cos`` and ``sin`` (rows, head_dim), as transformers' ``apply_rotary_pos_emb``;
        returns ``x``."""
        rows, heads, head_dim = x.shape
        if x.stride(2) != 1 or x.stride(1) != head_dim or head_dim % 2:
            raise ValueError(f"rope: heads of {head_dim} contiguous values needed")
        _rows(x[:, 0], "rope input")  # dtype, device, one head's values in a row
        if rows > 1 and x.stride(0) < heads * head_dim:
            raise ValueError(f"rope: rows of {tuple(x.shape)} overlap (strides {x.stride()})")
        for table in (cos, sin):
            _rows(table, "rope table")
            if table.shape != (rows, head_dim) or not table.is_contiguous():
                raise ValueError(f"rope table {tuple(table.shape)} does not fit {tuple(x.shape)}")
        self._rope(x.data_ptr(), x.stride(0), heads, head_dim, cos.data_ptr(), sin.data_ptr(), rows)
        return x

    def silu_mul(self, gate_up: torch.Tensor, intermediate: int) -> torch.Tensor:
        """``silu(gate_up[:, :I]) * gate_up[:, I:2I]`` into a new (rows, I) tensor."""
        _rows(gate_up, "gate/up")
        rows = gate_up.shape[0]
        if gate_up.shape[1] < 2 * intermediate:
            raise ValueError(f"gate/up {tuple(gate_up.shape)} narrower than 2 x {intermediate}")
        out = torch.empty((rows, intermediate), dtype=torch.float32)
        self._silu_mul(
            gate_up.data_ptr(),
            gate_up.stride(0),
            intermediate,
            out.data_ptr(),
            intermediate,
            rows,
        )
        return out


def load_layer_ops(cache_dir: Path, compiler: str = "cc") -> LayerOps:
    """Build (once per machine and source) and load the layer operations.

    Raises :class:`~engine.kernels.build.KernelBuildError` when there is no compiler or the
    build fails."""
    path, lib = load_library("layer_ops.c", cache_dir, compiler)
    norm = lib.pd_add_rms_norm
    norm.restype = None
    norm.argtypes = [_PTR, _I64, _PTR, _I64, _PTR, _F32, _PTR, _I64, _I64, _I64]
    rope = lib.pd_rope
    rope.restype = None
    rope.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64]
    silu = lib.pd_silu_mul
    silu.restype = None
    silu.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _I64]
    return LayerOps(path, norm, rope, silu)
