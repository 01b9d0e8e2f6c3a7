"""Binary frame format of the KV transfer channel. No pickle: fixed little-endian structs.

Every message is a ZeroMQ multipart message whose first frame is a header::

    common   magic "PDKV" | version u16 | kind u8 | flags u8 | transfer_id 16 bytes
    PAGE     layer_start u16 | layer_end u16 | num_blocks u32 | block_size u16 | kv_heads u16
             | head_dim u16 | dtype u8 | payload_nbytes u64 | crc32 u32 | block_ids u32 x n
    DONE     first_token_id u32 | num_layers u32
    ABORT    utf-8 reason
    ACK      status u8 | utf-8 message

A PAGE header is followed by exactly one payload frame: the K and V of ``num_blocks`` blocks for
layers ``[layer_start, layer_end)``, shaped ``(layers, 2, num_blocks, block_size, kv_heads,
head_dim)``, C-contiguous. Decoders raise :class:`MalformedFrameError` on anything off.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

import torch

MAGIC = b"PDKV"
PROTOCOL_VERSION = 1
TRANSFER_ID_BYTES = 16
MAX_BLOCKS_PER_PAGE = 1 << 20

_COMMON = struct.Struct("<4sHBB16s")
_PAGE = struct.Struct("<HHIHHHBQI")
_DONE = struct.Struct("<II")
_ACK = struct.Struct("<B")

FLAG_CHECKSUM = 0x01


class MalformedFrameError(ValueError):
    """A frame failed validation; it must be dropped and never reach the KV cache."""


class FrameKind(enum.IntEnum):
    PAGE = 1
    DONE = 2
    ABORT = 3
    ACK = 4


class AckStatus(enum.IntEnum):
    OK = 0
    FAILED = 1


DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class PageHeader:
    transfer_id: bytes
    layer_start: int
    layer_end: int
    block_ids: tuple[int, ...]
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    payload_nbytes: int
    crc32: int | None  # None when the sender did not checksum

    @property
    def shape(self) -> tuple[int, ...]:
        layers = self.layer_end - self.layer_start
        return (layers, 2, len(self.block_ids), self.block_size, self.num_kv_heads, self.head_dim)

    def expected_nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class DoneHeader:
    transfer_id: bytes
    first_token_id: int
    num_layers: int


@dataclass(frozen=True)
class AbortHeader:
    transfer_id: bytes
    reason: str


@dataclass(frozen=True)
class AckHeader:
    transfer_id: bytes
    status: AckStatus
    message: str


Header = PageHeader | DoneHeader | AbortHeader | AckHeader


def checksum(payload: memoryview | bytes) -> int:
    return zlib.crc32(payload) & 0xFFFFFFFF


def encode(header: Header) -> bytes:
    """Serialize a header frame."""
    flags = 0
    if isinstance(header, PageHeader):
        if header.crc32 is not None:
            flags |= FLAG_CHECKSUM
        body = _PAGE.pack(
            header.layer_start,
            header.layer_end,
            len(header.block_ids),
            header.block_size,
            header.num_kv_heads,
            header.head_dim,
            DTYPE_CODES[header.dtype],
            header.payload_nbytes,
            header.crc32 or 0,
        ) + struct.pack(f"<{len(header.block_ids)}I", *header.block_ids)
        kind = FrameKind.PAGE
    elif isinstance(header, DoneHeader):
        body, kind = _DONE.pack(header.first_token_id, header.num_layers), FrameKind.DONE
    elif isinstance(header, AbortHeader):
        body, kind = header.reason.encode()[:1024], FrameKind.ABORT
    else:
        body = _ACK.pack(header.status) + header.message.encode()[:1024]
        kind = FrameKind.ACK
    _check_transfer_id(header.transfer_id)
    return _COMMON.pack(MAGIC, PROTOCOL_VERSION, kind, flags, header.transfer_id) + body


def decode(frame: bytes | memoryview) -> Header:
    """Parse and validate a header frame; raises :class:`MalformedFrameError`."""
    data = bytes(frame)
    if len(data) < _COMMON.size:
        raise MalformedFrameError(f"header of {len(data)} bytes is shorter than {_COMMON.size}")
    magic, version, kind_code, flags, transfer_id = _COMMON.unpack_from(data)
    if magic != MAGIC:
        raise MalformedFrameError(f"bad magic {magic!r}")
    if version != PROTOCOL_VERSION:
        raise MalformedFrameError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
    try:
        kind = FrameKind(kind_code)
    except ValueError:
        raise MalformedFrameError(f"unknown frame kind {kind_code}") from None
    body = data[_COMMON.size :]
    if kind is FrameKind.PAGE:
        return _decode_page(transfer_id, flags, body)
    if kind is FrameKind.DONE:
        if len(body) != _DONE.size:
            raise MalformedFrameError(f"DONE body of {len(body)} bytes, expected {_DONE.size}")
        first_token, num_layers = _DONE.unpack(body)
        return DoneHeader(transfer_id, first_token, num_layers)
    if kind is FrameKind.ABORT:
        return AbortHeader(transfer_id, body.decode(errors="replace"))
    if len(body) < _ACK.size:
        raise MalformedFrameError("ACK body is empty")
    try:
        status = AckStatus(body[0])
    except ValueError:
        raise MalformedFrameError(f"unknown ACK status {body[0]}") from None
    return AckHeader(transfer_id, status, body[1:].decode(errors="replace"))


def _decode_page(transfer_id: bytes, flags: int, body: bytes) -> PageHeader:
    if len(body) < _PAGE.size:
        raise MalformedFrameError(f"PAGE body of {len(body)} bytes is shorter than {_PAGE.size}")
    (start, end, n, block_size, kv_heads, head_dim, dtype_code, nbytes, crc) = _PAGE.unpack_from(
        body
    )
    if not 0 < n <= MAX_BLOCKS_PER_PAGE:
        raise MalformedFrameError(f"PAGE carries {n} blocks")
    if len(body) != _PAGE.size + 4 * n:
        raise MalformedFrameError(
            f"PAGE header is {len(body)} bytes; {n} block ids need {_PAGE.size + 4 * n}"
        )
    if end <= start:
        raise MalformedFrameError(f"empty layer range [{start}, {end})")
    if dtype_code not in CODE_DTYPES:
        raise MalformedFrameError(f"unknown dtype code {dtype_code}")
    if 0 in (block_size, kv_heads, head_dim):
        raise MalformedFrameError("zero block_size, kv_heads or head_dim")
    block_ids = struct.unpack_from(f"<{n}I", body, _PAGE.size)
    header = PageHeader(
        transfer_id=transfer_id,
        layer_start=start,
        layer_end=end,
        block_ids=tuple(block_ids),
        block_size=block_size,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=CODE_DTYPES[dtype_code],
        payload_nbytes=nbytes,
        crc32=crc if flags & FLAG_CHECKSUM else None,
    )
    if header.expected_nbytes() != nbytes:
        raise MalformedFrameError(
            f"PAGE declares {nbytes} payload bytes; its shape needs {header.expected_nbytes()}"
        )
    return header


def verify_payload(
    header: PageHeader, payload: memoryview, *, verify_checksum: bool = True
) -> None:
    """Check a payload frame's size, and its checksum when the sender sent one and
    ``verify_checksum`` is set; raises :class:`MalformedFrameError`."""
    if payload.nbytes != header.payload_nbytes:
        raise MalformedFrameError(
            f"payload of {payload.nbytes} bytes, header declares {header.payload_nbytes}"
        )
    if verify_checksum and header.crc32 is not None and checksum(payload) != header.crc32:
        raise MalformedFrameError("payload checksum mismatch (corrupted page)")


def _check_transfer_id(transfer_id: bytes) -> None:
    if len(transfer_id) != TRANSFER_ID_BYTES:
        raise ValueError(f"transfer id must be {TRANSFER_ID_BYTES} bytes, got {len(transfer_id)}")
