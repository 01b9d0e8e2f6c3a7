"""``linear.c`` loaded: float32 linear layers on CPU over weights packed once into panels."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.kernels.build import KernelBuildError, load_library

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
        x: torch.Tensor,  # (M, K), float32, unit stride along K
        packed: torch.Tensor,  # from pack(): (ceil(N / panel), K, panel)
        bias: torch.Tensor | None,  # (N,) contiguous, or None
        out: torch.Tensor,  # (M, N), float32, unit stride along N: written
    ) -> None:
        m, k = x.shape
        n = out.shape[1]
        if (
            x.stride(1) != 1
            or out.stride(1) != 1
            or out.shape[0] != m
            or packed.shape != (-(-n // self.panel), k, self.panel)
            or (bias is not None and (bias.shape != (n,) or not bias.is_contiguous()))
        ):
            raise ValueError(
                f"linear kernel: x {tuple(x.shape)}, packed {tuple(packed.shape)}, "
                f"out {tuple(out.shape)} do not fit"
            )
        rc = self._run(
            x.data_ptr(),
            x.stride(0),
            packed.data_ptr(),
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            out.stride(0),
            m,
            k,
            n,
            0,  # as many threads as torch uses on the calling thread
        )
        if rc != 0:
            raise ValueError(f"linear kernel refused x {tuple(x.shape)} -> {n} (rc {rc})")


def load_linear(cache_dir: Path, compiler: str = "cc") -> LinearKernel:
    """Build (once per machine and source) and load the linear kernel.

    Raises :class:`KernelBuildError` when there is no compiler, the build fails, or this CPU has
    no AVX-512 (the kernel's only code path)."""
    path, lib = load_library("linear.c", cache_dir, compiler)
    lib.pd_linear_supported.restype = ctypes.c_int
    if not lib.pd_linear_supported():
        raise KernelBuildError("the linear kernel needs AVX-512, which this CPU lacks")
    run = lib.pd_linear
    run.restype = ctypes.c_int
    run.argtypes = [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, ctypes.c_int]
    pack = lib.pd_linear_pack
    pack.restype = None
    pack.argtypes = [_PTR, _I64, _I64, _PTR]
    lib.pd_linear_panel.restype = ctypes.c_int
    return LinearKernel(path, lib.pd_linear_panel(), run, pack)
