"""Binary frame format of the KV transfer channel. No pickle: fixed little-endian structs.

Every message's first frame is a header: a prefix (magic, version, kind, flags, transfer id),
a body per kind and a tag over prefix + payload (``kvtransfer.frame_auth``); the layout is
beside the structs below and changes only with ``PROTOCOL_VERSION``. Decoders raise
:class:`MalformedFrameError` on anything off, :class:`UnauthenticatedFrameError` when the tag
does not verify: such a frame never reaches the KV cache.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

import torch

from core.ticket import KV_PROTOCOL_VERSION
from kvtransfer.frame_auth import FLAG_CHECKSUM as FLAG_CHECKSUM
from kvtransfer.frame_auth import FLAG_ENCRYPTED as FLAG_ENCRYPTED
from kvtransfer.frame_auth import FLAG_MAC as FLAG_MAC
from kvtransfer.frame_auth import TAG_BYTES as TAG_BYTES
from kvtransfer.frame_auth import FrameAuth as FrameAuth
from kvtransfer.frame_auth import MalformedFrameError as MalformedFrameError
from kvtransfer.frame_auth import Payload as Payload
from kvtransfer.frame_auth import PayloadCheck as PayloadCheck
from kvtransfer.frame_auth import Sealed as Sealed
from kvtransfer.frame_auth import UnauthenticatedFrameError as UnauthenticatedFrameError

MAGIC = b"PDKV"
PROTOCOL_VERSION = KV_PROTOCOL_VERSION  # declared with the Fingerprint that peers compare
TRANSFER_ID_BYTES = 16
MAX_BLOCKS_PER_PAGE = 1 << 20
MAX_TEXT_BYTES = 4096
MAX_PAYLOAD_BYTES = 1 << 32  # one page; far above any real layer range

# The header frame::
#
#     prefix   magic "PDKV" | version u16 | kind u8 | flags u8 | transfer_id 16 bytes | body
#     tag      32 bytes, last: with the fleet key, a 96-bit nonce and an AES-256-GMAC over
#              prefix + payload (keys derived from the fleet key by HKDF); encrypted, the nonce
#              and the AES-256-GCM tag of the payload with the prefix as associated data (the
#              payload is sent as ciphertext); else the XXH3-64 checksum of prefix + payload
#              (first 8 bytes) when checksums are on; else zeros (then 4 zero bytes)
#
#     PAGE     layer_start u16 | layer_end u16 | num_blocks u32 | block_size u16 | kv_heads u16
#              | head_dim u16 | dtype u8 | payload_nbytes u64 | block_ids u32 x n
#     DONE     first_token_id u32 | num_layers u32
#     ABORT    utf-8 reason
#     ACK      status u8 | utf-8 message
#     HELLO, WELCOME, REFUSE   utf-8 JSON object (handshake; see ``kvtransfer.handshake``)
#
# A PAGE's payload is ``(layers, 2, num_blocks, block_size, kv_heads, head_dim)``, C-contiguous:
# in the second frame with the ZeroMQ backend, or out of band (flag ``FLAG_OUT_OF_BAND``) over a
# torch.distributed pair group or a direct stream socket (``kvtransfer.datapath``).
_PREFIX = struct.Struct("<4sHBB16s")
_PAGE = struct.Struct("<HHIHHHBQ")
_DONE = struct.Struct("<II")
_ACK = struct.Struct("<B")

FLAG_OUT_OF_BAND = 0x04


class FrameKind(enum.IntEnum):
    PAGE = 1
    DONE = 2
    ABORT = 3
    ACK = 4
    HELLO = 5
    WELCOME = 6
    REFUSE = 7


class AckStatus(enum.IntEnum):
    OK = 0
    FAILED = 1


HANDSHAKE_REQUIRED = "handshake required"
"""A FAILED ACK's message for a DONE, or the first frame of a reserved transfer (which then
fails at once), from a peer the receiver does not know (it restarted, or forgot the peer): the
sender must handshake again."""


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
    out_of_band: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        layers = self.layer_end - self.layer_start
        return (layers, 2, len(self.block_ids), self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def layers(self) -> slice:
        return slice(self.layer_start, self.layer_end)

    def expected_nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize


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


@dataclass(frozen=True)
class HandshakeHeader:
    """HELLO (sender -> receiver), WELCOME or REFUSE (receiver -> sender)."""

    transfer_id: bytes  # a random handshake id, echoed in the answer
    kind: FrameKind
    fields: dict[str, Any]


Header = PageHeader | DoneHeader | AbortHeader | AckHeader | HandshakeHeader


def encode(header: Header, auth: FrameAuth, payload: Payload | None = None) -> bytes:
    """Serialize a header frame, sealing it (with its payload, if any) by ``auth``; a payload
    on an encrypting channel goes through :func:`seal` instead (its ciphertext is sent)."""
    prefix = _prefix(header, auth)
    return prefix + auth.tag(prefix, payload)


def seal(header: Header, auth: FrameAuth, payload: Payload | None) -> Sealed:
    """Serialize a header frame sealed with its payload: ``(frame, payload to send)``, the
    payload being its ciphertext on an encrypting channel, else ``payload`` itself."""
    prefix = _prefix(header, auth)
    tag, sent = auth.seal(prefix, payload)
    return Sealed(prefix + tag, sent)


def _prefix(header: Header, auth: FrameAuth) -> bytes:
    """A header frame without its tag."""
    flags = auth.flags
    if isinstance(header, PageHeader):
        if header.out_of_band:
            flags |= FLAG_OUT_OF_BAND
        body = _PAGE.pack(
            header.layer_start,
            header.layer_end,
            len(header.block_ids),
            header.block_size,
            header.num_kv_heads,
            header.head_dim,
            DTYPE_CODES[header.dtype],
            header.payload_nbytes,
        ) + struct.pack(f"<{len(header.block_ids)}I", *header.block_ids)
        kind = FrameKind.PAGE
    elif isinstance(header, DoneHeader):
        body, kind = _DONE.pack(header.first_token_id, header.num_layers), FrameKind.DONE
    elif isinstance(header, AbortHeader):
        body, kind = header.reason.encode()[:MAX_TEXT_BYTES], FrameKind.ABORT
    elif isinstance(header, AckHeader):
        body = _ACK.pack(header.status) + header.message.encode()[:MAX_TEXT_BYTES]
        kind = FrameKind.ACK
    else:
        body, kind = json.dumps(header.fields).encode(), header.kind
        if len(body) > MAX_TEXT_BYTES:
            raise ValueError("handshake fields too large")
    if len(header.transfer_id) != TRANSFER_ID_BYTES:
        raise ValueError(f"transfer id must be {TRANSFER_ID_BYTES} bytes")
    return _PREFIX.pack(MAGIC, PROTOCOL_VERSION, kind, flags, header.transfer_id) + body


def split(frame: bytes | memoryview) -> tuple[int, bytes, bytes]:
    """``(flags, prefix, tag)`` of a header frame, checking only its framing."""
    data = bytes(frame)
    if len(data) < _PREFIX.size + TAG_BYTES:
        raise MalformedFrameError(f"header of {len(data)} bytes is too short")
    magic, version, _, flags, _ = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise MalformedFrameError(f"bad magic {magic!r}")
    if version != PROTOCOL_VERSION:
        raise MalformedFrameError(f"protocol version {version}, expected {PROTOCOL_VERSION}")
    return flags, data[:-TAG_BYTES], data[-TAG_BYTES:]


def decode(
    frame: bytes | memoryview,
    auth: FrameAuth,
    payload: memoryview | None = None,
    *,
    defer_page: bool = False,
) -> Header:
    """Parse, authenticate and validate a header frame (with its in-band payload, if any).

    A PAGE's tag is not checked here when its payload is out of band, or when ``defer_page``
    asks for it (the caller copies the payload into place, feeding :func:`payload_check`, and
    verifies before the page counts)."""
    flags, prefix, tag = split(frame)
    _, _, kind_code, _, transfer_id = _PREFIX.unpack_from(prefix)
    try:
        kind = FrameKind(kind_code)
    except ValueError:
        raise MalformedFrameError(f"unknown frame kind {kind_code}") from None
    if not (kind is FrameKind.PAGE and (defer_page or flags & FLAG_OUT_OF_BAND)):
        auth.verify(flags, prefix, tag, payload)
    body = prefix[_PREFIX.size :]
    if kind is FrameKind.PAGE:
        return _decode_page(transfer_id, flags, body)
    if kind is FrameKind.DONE:
        if len(body) != _DONE.size:
            raise MalformedFrameError(f"DONE body of {len(body)} bytes, expected {_DONE.size}")
        first_token, num_layers = _DONE.unpack(body)
        return DoneHeader(transfer_id, first_token, num_layers)
    if kind is FrameKind.ABORT:
        return AbortHeader(transfer_id, body.decode(errors="replace"))
    if kind is FrameKind.ACK:
        if len(body) < _ACK.size:
            raise MalformedFrameError("ACK body is empty")
        try:
            status = AckStatus(body[0])
        except ValueError:
            raise MalformedFrameError(f"unknown ACK status {body[0]}") from None
        return AckHeader(transfer_id, status, body[1:].decode(errors="replace"))
    if len(body) > MAX_TEXT_BYTES:  # encode() never sends more
        raise MalformedFrameError(f"handshake body of {len(body)} bytes is too large")
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError) as exc:  # not UTF-8 or JSON; a number or nesting too big
        raise MalformedFrameError(f"handshake body is not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise MalformedFrameError("handshake body is not a JSON object")
    return HandshakeHeader(transfer_id, kind, fields)


def verify_page(frame: bytes | memoryview, auth: FrameAuth, payload: Payload | None) -> None:
    """Authenticate a PAGE decoded without its payload (out of band, or deferred) together
    with that payload."""
    flags, prefix, tag = split(frame)
    auth.verify(flags, prefix, tag, payload)


def payload_check(frame: bytes | memoryview, auth: FrameAuth) -> PayloadCheck:
    """A verifier for the payload of a PAGE decoded without it, to be fed the payload as it
    arrives or is copied into place (the header's framing is checked now)."""
    flags, prefix, tag = split(frame)
    return auth.check(flags, prefix, tag)


def _decode_page(transfer_id: bytes, flags: int, body: bytes) -> PageHeader:
    if len(body) < _PAGE.size:
        raise MalformedFrameError(f"PAGE body of {len(body)} bytes is shorter than {_PAGE.size}")
    (start, end, n, block_size, kv_heads, head_dim, dtype_code, nbytes) = _PAGE.unpack_from(body)
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
    header = PageHeader(
        transfer_id=transfer_id,
        layer_start=start,
        layer_end=end,
        block_ids=struct.unpack_from(f"<{n}I", body, _PAGE.size),
        block_size=block_size,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=CODE_DTYPES[dtype_code],
        payload_nbytes=nbytes,
        out_of_band=bool(flags & FLAG_OUT_OF_BAND),
    )
    if header.expected_nbytes() != nbytes:
        raise MalformedFrameError(
            f"PAGE declares {nbytes} payload bytes; its shape needs {header.expected_nbytes()}"
        )
    return header


def check_payload_size(header: PageHeader, payload: memoryview) -> None:
    if payload.nbytes != header.payload_nbytes:
        raise MalformedFrameError(
            f"size: payload of {payload.nbytes} bytes, header declares {header.payload_nbytes}"
        )


def is_out_of_band_page(frame: bytes | memoryview) -> bool:
    """Whether a frame claims to be a PAGE whose payload follows out of band (unvalidated)."""
    data = bytes(frame[: _PREFIX.size])
    if len(data) < _PREFIX.size:
        return False
    magic, _, kind, flags, _ = _PREFIX.unpack_from(data)
    return magic == MAGIC and kind == FrameKind.PAGE and bool(flags & FLAG_OUT_OF_BAND)


def out_of_band_payload_size(frame: bytes | memoryview) -> int | None:
    """The size of the payload that follows an out-of-band PAGE header, read without checking
    its tag, when the header is self-consistent (so a refused page's payload can still be taken
    off its pair group); None when the size cannot be trusted."""
    if not is_out_of_band_page(frame):
        return None
    data = bytes(frame)
    try:
        header = _decode_page(bytes(16), FLAG_OUT_OF_BAND, data[_PREFIX.size : -TAG_BYTES])
    except (MalformedFrameError, struct.error):
        return None
    if header.payload_nbytes > MAX_PAYLOAD_BYTES:
        return None
    return header.payload_nbytes
