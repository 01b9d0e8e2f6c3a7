"""Native CPU kernels: C compiled on this machine at first use, called through ctypes.

Why C: paged attention over blocks scattered in the pool has no torch operator on CPU; in torch it
takes a gather of every sequence's blocks per layer (a copy as large as the contexts) before
attention reads them again. The kernel reads each K and V slot once, in place.

Why at run time: ``-march=native`` (AVX-512 where the CPU has it) and no build step in the
install. The shared object is cached under the model cache directory, keyed by the source, the
flags, the compiler and the CPU, and written atomically (workers starting together may race to
build it: the last rename wins, every copy is the same). Without a C compiler the engine logs it
and keeps the torch path (see :class:`engine.config.AttentionKernel`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

SOURCE = "paged_attention.c"
CFLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fopenmp",
    "-fPIC",
    "-shared",
    "-std=c11",
)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


class KernelBuildError(RuntimeError):
    """The native kernel could not be compiled or loaded here (no compiler, build failed)."""


@dataclass(frozen=True)
class PagedAttentionKernel:
    """``pd_paged_attention`` from :file:`paged_attention.c`, loaded."""

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
            0,  # as many threads as torch uses on the calling thread
        )
        if rc != 0:
            raise ValueError(
                f"paged attention kernel refused its arguments (rc {rc}): heads {heads}, "
                f"kv heads {kv_heads}, head dim {head_dim}, block table {tuple(block_table.shape)}"
            )


def load_paged_attention(cache_dir: Path, compiler: str = "cc") -> PagedAttentionKernel:
    """Build (once per machine and source) and load the paged attention kernel.

    Raises :class:`KernelBuildError` when there is no compiler or the build fails."""
    path = _build(cache_dir / "kernels", compiler)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelBuildError(f"cannot load {path}: {exc}") from exc
    fn = lib.pd_paged_attention
    fn.restype = ctypes.c_int
    fn.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR]
    fn.argtypes += [_I64] * 5 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    return PagedAttentionKernel(path, fn)


def _build(out_dir: Path, compiler: str) -> Path:
    """The shared object for this source, compiler and CPU: found in ``out_dir`` (e.g. built
    into the image), else compiled into it, or into the temp directory when ``out_dir`` is not
    writable (containers with a read-only root and an emptyDir on /tmp)."""
    exe = shutil.which(compiler)
    if exe is None:
        raise KernelBuildError(f"no C compiler ({compiler!r} is not on PATH)")
    source = resources.files(__package__).joinpath(SOURCE).read_bytes()
    version = subprocess.run(
        [exe, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    key = hashlib.sha256(
        b"\0".join([source, " ".join(CFLAGS).encode(), *(v.encode() for v in version), _cpu_id()])
    ).hexdigest()[:16]
    name = f"paged_attention-{key}.so"
    fallback = Path(tempfile.gettempdir()) / "pdserve-kernels"
    for found in (out_dir / name, fallback / name):
        if found.exists():
            return found
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(out_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        out_dir = fallback
        out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / name
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src = Path(tmp) / SOURCE
        src.write_bytes(source)
        built = Path(tmp) / name
        result = subprocess.run(
            [exe, *CFLAGS, "-o", str(built), str(src), "-lm"],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise KernelBuildError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


def _cpu_id() -> bytes:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo", "rb") as info:
            lines = [
                ln for ln in info.read().splitlines() if ln.startswith((b"model name", b"flags"))
            ]
        return b"\n".join(sorted(set(lines)))
    except OSError:
        return b"unknown"
