"""``linear.c`` loaded: float32 linear layers on CPU over weights packed once into panels
(AVX-512 where the CPU has it, the compiler's generic vectors elsewhere)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.kernels.build import load_library, rows_apart

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


@dataclass(frozen=True)
class LinearKernel:
    """``pd_linear`` and ``pd_linear_pack`` of :file:`linear.c`."""

    path: Path
    panel: int
    """Output columns per packed panel."""
    _run: Callable[..., int]
    _pack: Callable[..., None]

    @staticmethod
    def supports(dtype: torch.dtype, device: torch.device) -> bool:
        return device.type == "cpu" and dtype == torch.float32

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (out_features, in_features) as the kernel reads it: (panels, in, panel),
        the last panel zero-padded. A copy; ``weight`` is unchanged."""
        w = weight.detach().contiguous()
        if w.dim() != 2 or not self.supports(w.dtype, w.device):
            raise ValueError(f"cannot pack a {w.dtype} {tuple(w.shape)} weight on {w.device}")
        n, k = w.shape
        packed = torch.empty((-(-n // self.panel), k, self.panel), dtype=torch.float32)
        self._pack(w.data_ptr(), n, k, packed.data_ptr())
        return packed

    def __call__(
        self,
        x: torch.Tensor,  # (M, K), float32, unit stride along K, rows at least K apart
        packed: torch.Tensor,  # from pack(): (ceil(N / panel), K, panel)
        bias: torch.Tensor | None,  # (N,) contiguous, or None
        out: torch.Tensor,  # (M, N), float32, unit stride along N: written
    ) -> None:
        """``out = x @ W.T + bias`` for the weight ``W`` that ``packed`` was packed from.
        Raises ValueError for arguments the kernel cannot read or write as given (rows that
        overlap, other dtypes or devices, shapes that do not fit)."""
        tensors = [("x", x), ("packed", packed), ("out", out)]
        if bias is not None:
            tensors.append(("bias", bias))
        for what, t in tensors:
            if not self.supports(t.dtype, t.device):
                raise ValueError(f"linear kernel: {what} is {t.dtype} on {t.device}")
        if x.dim() != 2 or out.dim() != 2:
            raise ValueError(f"linear kernel: x {tuple(x.shape)} and out {tuple(out.shape)}")
        m, k = x.shape
        n = out.shape[1]
        if (
            m == 0
            or not rows_apart(x)
            or not rows_apart(out)
            or out.shape[0] != m
            or packed.shape != (-(-n // self.panel), k, self.panel)
            or not packed.is_contiguous()
            or (bias is not None and (bias.shape != (n,) or not bias.is_contiguous()))
        ):
            raise ValueError(
                f"linear kernel: x {tuple(x.shape)} strides {x.stride()}, packed "
                f"{tuple(packed.shape)}, out {tuple(out.shape)} strides {out.stride()} do not fit"
            )
        self.run(x, packed, bias, out)

    def run(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        bias: torch.Tensor | None,
        out: torch.Tensor,
    ) -> None:
        """``__call__`` without its checks, for callers whose arguments hold what it checks by
        construction (:class:`engine.linear.NativeLinear`: 121 calls per decode step, where the
        checks cost ~5 us each)."""
        m, k = x.shape
        n = out.shape[1]
        rc = self._run(
            x.data_ptr(),
            max(x.stride(0), k),  # one row: any stride
            packed.data_ptr(),
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            max(out.stride(0), n),
            m,
            k,
            n,
        )  # on as many threads as torch uses on the calling thread
        if rc != 0:
            raise ValueError(f"linear kernel refused x {tuple(x.shape)} -> {n} (rc {rc})")


def load_linear(
    cache_dir: Path, compiler: str = "cc", extra_flags: tuple[str, ...] = ()
) -> LinearKernel:
    """Build (once per machine, source and flags) and load the linear kernel.

    Raises :class:`KernelBuildError` when there is no compiler or the build fails."""
    path, lib = load_library("linear.c", cache_dir, compiler, extra_flags)
    run = lib.pd_linear
    run.restype = ctypes.c_int
    run.argtypes = [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64]
    pack = lib.pd_linear_pack
    pack.restype = None
    pack.argtypes = [_PTR, _I64, _I64, _PTR]
    lib.pd_linear_panel.restype = ctypes.c_int
    return LinearKernel(path, lib.pd_linear_panel(), run, pack)
