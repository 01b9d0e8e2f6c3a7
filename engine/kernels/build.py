"""Compile a kernel source of this package on this machine, once, and load it.

A source may include the package's headers (``*.h``, copied beside it for the build).

The shared object is cached under ``<cache>/kernels``, keyed by the source, the flags, the
compiler and the CPU, and written atomically (workers starting together may race to build it: the
last rename wins, every copy is the same). Where that directory is not writable (a read-only
image), it goes to the temp directory. :func:`rows_apart` is what the wrappers check of the
row-major tensors they hand to a kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

CFLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-fopenmp",
    "-fPIC",
    "-shared",
    "-std=c11",
)


def rows_apart(t: torch.Tensor) -> bool:
    """Whether a kernel can read or write the rows of 2-D ``t`` as given: unit stride along a
    row, and rows that do not overlap (any row stride at least the row's length)."""
    return t.stride(1) == 1 and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1])


class KernelBuildError(RuntimeError):
    """A native kernel could not be compiled or loaded here (no compiler, build failed)."""


def load_library(
    source: str, cache_dir: Path, compiler: str = "cc", extra_flags: tuple[str, ...] = ()
) -> tuple[Path, ctypes.CDLL]:
    """Build ``source`` (a ``.c`` file of this package) if needed and load it. ``extra_flags``
    follow :data:`CFLAGS` (tests build the portable paths with ``-mno-avx512f``).

    Raises :class:`KernelBuildError` when there is no compiler or the build or load fails."""
    path = build(source, cache_dir / "kernels", compiler, extra_flags)
    try:
        return path, ctypes.CDLL(str(path))
    except OSError as exc:
        raise KernelBuildError(f"cannot load {path}: {exc}") from exc


def build(source: str, out_dir: Path, compiler: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """The shared object for ``source``, this compiler and CPU: found in ``out_dir`` (e.g. built
    into the image), else compiled into it, or into the temp directory when ``out_dir`` is not
    writable (containers with a read-only root and an emptyDir on /tmp)."""
    exe = shutil.which(compiler)
    if exe is None:
        raise KernelBuildError(f"no C compiler ({compiler!r} is not on PATH)")
    package = resources.files(__package__)
    text = package.joinpath(source).read_bytes()
    headers = {
        entry.name: entry.read_bytes()
        for entry in sorted(package.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".h")
    }
    flags = (*CFLAGS, *extra_flags)
    version = subprocess.run(
        [exe, "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[:1]
    key = hashlib.sha256(
        b"\0".join(
            [text, *headers.values(), " ".join(flags).encode()]
            + [v.encode() for v in version]
            + [_cpu_id()]
        )
    ).hexdigest()[:16]
    name = f"{Path(source).stem}-{key}.so"
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
        src = Path(tmp) / source
        src.write_bytes(text)
        for header_name, header in headers.items():  # the sources' shared headers, beside them
            (Path(tmp) / header_name).write_bytes(header)
        built = Path(tmp) / name
        result = subprocess.run(
            [exe, *flags, "-o", str(built), str(src), "-lm"],
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
