"""``quant_linear.c`` loaded: linear layers computed from GGUF quantized blocks (CPU, AVX2).

:class:`QuantFormat` names the block formats; :class:`QuantizedWeight` is one weight as GGUF
rows of blocks, with the reference de-quantization (gguf's arithmetic, in torch) the kernel is
held to bit for bit; :class:`QuantLinearKernel` packs and multiplies.
"""

from __future__ import annotations

import ctypes
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.kernels.build import KernelBuildError, load_library, rows_apart

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
BLOCK = 32
"""Weights per block along the input dimension, in every format here."""


class QuantFormat(enum.Enum):
    """GGUF block formats the kernel computes from (value: the kernel's format code)."""

    Q8_0 = 0  # float16 d, 32 int8: w = d * q
    Q4_0 = 1  # float16 d, 16 bytes of nibbles: w = d * (q - 8)
    Q4_1 = 2  # float16 d, float16 m, 16 bytes of nibbles: w = d * q + m

    @property
    def block_bytes(self) -> int:
        return {QuantFormat.Q8_0: 34, QuantFormat.Q4_0: 18, QuantFormat.Q4_1: 20}[self]

    @property
    def bits_per_weight(self) -> float:
        return self.block_bytes * 8 / BLOCK


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear layer's weight (out_features, in_features) as GGUF stores it: each output row a
    run of blocks of ``BLOCK`` inputs, ``rows`` uint8 (out_features, blocks * block_bytes)."""

    format: QuantFormat
    rows: torch.Tensor
    in_features: int

    def __post_init__(self) -> None:
        blocks, rest = divmod(self.in_features, BLOCK)
        if (
            rest
            or self.rows.dtype != torch.uint8
            or self.rows.dim() != 2
            or self.rows.shape[1] != blocks * self.format.block_bytes
        ):
            raise ValueError(
                f"{self.format.name} rows {tuple(self.rows.shape)} {self.rows.dtype} do not hold "
                f"{self.in_features} inputs in blocks of {BLOCK}"
            )

    @property
    def out_features(self) -> int:
        return int(self.rows.shape[0])

    @property
    def nbytes(self) -> int:
        return self.rows.numel()

    def select_rows(self, order: torch.Tensor) -> QuantizedWeight:
        """The weight with its output rows reordered (``order[i]``: the old row of row i)."""
        return QuantizedWeight(self.format, self.rows[order].contiguous(), self.in_features)

    @staticmethod
    def concat(parts: Sequence[QuantizedWeight]) -> QuantizedWeight:
        """Output rows of ``parts`` stacked (a fused projection); one format and width."""
        first = parts[0]
        if any(p.format != first.format or p.in_features != first.in_features for p in parts):
            raise ValueError("fused quantized weights must share format and input width")
        return QuantizedWeight(
            first.format, torch.cat([p.rows for p in parts]).contiguous(), first.in_features
        )

    def dequantize(self) -> torch.Tensor:
        """float32 (out_features, in_features), as gguf's reference de-quantization computes
        it (the numbers transformers loads from the GGUF file)."""
        n = self.out_features
        blocks = self.rows.view(n, -1, self.format.block_bytes)
        d = blocks[..., 0:2].contiguous().view(torch.float16).to(torch.float32)
        if self.format is QuantFormat.Q8_0:
            q = blocks[..., 2:].contiguous().view(torch.int8).to(torch.float32)
            return (q * d).reshape(n, self.in_features)
        packed = blocks[..., 4:] if self.format is QuantFormat.Q4_1 else blocks[..., 2:]
        nibbles = torch.cat((packed & 0x0F, packed >> 4), dim=-1)  # weights 0-15, then 16-31
        if self.format is QuantFormat.Q4_0:
            q = (nibbles.to(torch.int8) - 8).to(torch.float32)
            return (d * q).reshape(n, self.in_features)
        m = blocks[..., 2:4].contiguous().view(torch.float16).to(torch.float32)
        return (d * nibbles.to(torch.float32) + m).reshape(n, self.in_features)

    @staticmethod
    def quantize_q8_0(weight: torch.Tensor) -> QuantizedWeight:
        """``weight`` (float, in_features a multiple of ``BLOCK``) as Q8_0 blocks: per block
        of 32 inputs a float16 scale ``d = max|w| / 127`` and ``q = round(w / d)``
        (int8 weight-only quantization of float checkpoints)."""
        w = weight.detach().to(torch.float32)
        n, k = w.shape
        if k % BLOCK:
            raise ValueError(f"cannot quantize {k} inputs in blocks of {BLOCK}")
        groups = w.reshape(n, k // BLOCK, BLOCK)
        d = (groups.abs().amax(dim=-1, keepdim=True) / 127).to(torch.float16)
        d32 = d.to(torch.float32)
        safe = torch.where(d32 == 0, torch.ones_like(d32), d32)
        q = torch.round(groups / safe).clamp_(-127, 127).to(torch.int8)
        rows = torch.cat((d.view(torch.uint8), q.view(torch.uint8)), dim=-1)
        return QuantizedWeight(QuantFormat.Q8_0, rows.reshape(n, -1).contiguous(), k)


@dataclass(frozen=True)
class QuantLinearKernel:
    """``pd_quant_pack`` and ``pd_quant_linear`` of :file:`quant_linear.c`."""

    path: Path
    _run: Callable[..., int]
    _pack: Callable[..., int]
    _record_bytes: Callable[..., int]

    @staticmethod
    def supports(dtype: torch.dtype, device: torch.device) -> bool:
        """Activations it takes (weights are quantized)."""
        return device.type == "cpu" and dtype == torch.float32

    def pack(self, weight: QuantizedWeight) -> torch.Tensor:
        """``weight`` as the kernel reads it (panels of 16 output columns; see the C file)."""
        n, k = weight.out_features, weight.in_features
        code = weight.format.value
        size = -(-n // 16) * (k // BLOCK) * self._record_bytes(code)
        packed = torch.empty(size, dtype=torch.uint8)
        rows = weight.rows.contiguous()
        if self._pack(code, rows.data_ptr(), n, k, packed.data_ptr()) != 0:
            raise ValueError(f"cannot pack a {weight.format.name} weight of {n} x {k}")
        return packed

    def __call__(
        self,
        x: torch.Tensor,  # (M, K) float32, unit stride along K, rows apart
        fmt: QuantFormat,
        packed: torch.Tensor,  # from pack()
        bias: torch.Tensor | None,  # (N,) float32 contiguous, or None
        out: torch.Tensor,  # (M, N) float32, unit stride along N: written
    ) -> None:
        """``out = x @ W.T + bias`` for the weight ``packed`` came from; ValueError for
        arguments the kernel cannot read or write as given."""
        for what, t in (("x", x), ("out", out)) + ((("bias", bias),) if bias is not None else ()):
            if not self.supports(t.dtype, t.device) or (t.dim() == 2 and not rows_apart(t)):
                raise ValueError(
                    f"quant linear kernel: {what} {t.dtype} {tuple(t.shape)} strides "
                    f"{t.stride()} on {t.device}"
                )
        m, k = x.shape
        n = out.shape[1]
        expected = -(-n // 16) * (k // BLOCK) * self._record_bytes(fmt.value)
        if (
            m == 0
            or out.shape[0] != m
            or k % BLOCK
            or packed.dtype != torch.uint8
            or packed.numel() != expected
            or (bias is not None and (bias.shape != (n,) or not bias.is_contiguous()))
        ):
            raise ValueError(
                f"quant linear kernel: x {tuple(x.shape)}, packed {packed.numel()} bytes "
                f"(expected {expected}), out {tuple(out.shape)} do not fit"
            )
        self.run(x, fmt, packed, bias, out)

    def run(
        self,
        x: torch.Tensor,
        fmt: QuantFormat,
        packed: torch.Tensor,
        bias: torch.Tensor | None,
        out: torch.Tensor,
    ) -> None:
        """``__call__`` without its checks (callers whose arguments hold them by
        construction: :class:`engine.linear.QuantLinear`)."""
        m, k = x.shape
        n = out.shape[1]
        rc = self._run(
            fmt.value,
            x.data_ptr(),
            max(x.stride(0), k),
            packed.data_ptr(),
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            max(out.stride(0), n),
            m,
            k,
            n,
        )  # on as many threads as torch uses on the calling thread
        if rc != 0:
            raise ValueError(f"quant linear kernel refused x {tuple(x.shape)} -> {n} (rc {rc})")


def load_quant_linear(
    cache_dir: Path, compiler: str = "cc", extra_flags: tuple[str, ...] = ()
) -> QuantLinearKernel:
    """Build (once per machine, source and flags) and load the kernel.

    Raises :class:`KernelBuildError` when there is no compiler, the build fails, or the CPU
    lacks what the kernel needs (AVX2, FMA, F16C)."""
    path, lib = load_library("quant_linear.c", cache_dir, compiler, extra_flags)
    lib.pd_quant_available.restype = ctypes.c_int
    if not lib.pd_quant_available():
        raise KernelBuildError("the quantized linear kernel needs AVX2, FMA and F16C")
    run = lib.pd_quant_linear
    run.restype = ctypes.c_int
    run.argtypes = [ctypes.c_int, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64]
    pack = lib.pd_quant_pack
    pack.restype = ctypes.c_int
    pack.argtypes = [ctypes.c_int, _PTR, _I64, _I64, _PTR]
    record = lib.pd_quant_record_bytes
    record.restype = _I64
    record.argtypes = [ctypes.c_int]
    return QuantLinearKernel(path, run, pack, record)
