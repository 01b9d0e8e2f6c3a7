"""The tensors of a GGUF file (format v2/v3), read without de-quantizing anything.

gguf's own reader builds an object per metadata item (the default model's 49,152-entry
vocabulary took it 8.7 s); this one skips metadata values and maps only the tensors' data.
Invariant: a returned tensor's ``data`` is exactly its bytes in the file (rows of blocks).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ModelLoadError

_MAGIC = b"GGUF"
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0"}
"""GGUF tensor types this module names (others are read as ``"type<N>"`` with no data)."""
_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q8_0": (32, 34)}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type_name: str
    shape: tuple[int, ...]
    """GGUF's order: the fastest dimension first (a weight's input features)."""
    data: np.ndarray
    """uint8 (rows, bytes per row): rows over the other dimensions; empty for unknown types."""


def read_tensors(path: Path) -> list[GGUFTensor]:
    """Every tensor of the file at ``path``; raises :class:`ModelLoadError` when it is not a
    GGUF file this reader understands."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size < 24:  # mmap refuses an empty file
            raise ModelLoadError(f"{path.name}: not a GGUF file (too short)")
        buf = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(buf, path)
    except (struct.error, IndexError, ValueError) as exc:
        raise ModelLoadError(f"{path.name}: not a readable GGUF file ({exc})") from None


def _parse(buf: mmap.mmap, path: Path) -> list[GGUFTensor]:
    if buf[:4] != _MAGIC:
        raise ModelLoadError(f"{path.name}: not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ModelLoadError(f"{path.name}: GGUF version {version} is not supported")
    pos = 24
    alignment = 32
    for _ in range(n_kv):
        key, pos = _string(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        if key == "general.alignment" and vtype == 4:
            (alignment,) = struct.unpack_from("<I", buf, pos + 4)
        pos = _skip_value(buf, pos + 4, vtype)
    infos = []
    for _ in range(n_tensors):
        name, pos = _string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        shape = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ttype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, TYPE_NAMES.get(ttype, f"type{ttype}"), tuple(shape), offset))
    start = -(-pos // alignment) * alignment
    whole = np.frombuffer(buf, dtype=np.uint8)
    tensors = []
    for name, type_name, shape, offset in infos:
        rows = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if type_name in _BLOCKS:
            per, size = _BLOCKS[type_name]
            row_bytes = shape[0] // per * size
            begin = start + offset
            data = whole[begin : begin + rows * row_bytes].reshape(rows, row_bytes)
        else:
            data = np.empty((0, 0), dtype=np.uint8)
        tensors.append(GGUFTensor(name, type_name, shape, data))
    return tensors


def _string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + length
    return buf[pos + 8 : end].decode("utf-8", errors="replace"), end


def _skip_value(buf: mmap.mmap, pos: int, vtype: int) -> int:
    if vtype in _SCALARS:
        return pos + _SCALARS[vtype]
    if vtype == _STRING:
        (length,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + length
    if vtype == _ARRAY:
        itype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if itype in _SCALARS:
            return pos + _SCALARS[itype] * count
        for _ in range(count):
            pos = _skip_value(buf, pos, itype)
        return pos
    raise ValueError(f"unknown metadata type {vtype}")
