"""The KV wire format: every frame kind round-trips, and every malformed header is refused."""

from __future__ import annotations

import struct

import pytest
import torch

from kvtransfer import wire
from kvtransfer.wire import (
    AbortHeader,
    AckHeader,
    AckStatus,
    DoneHeader,
    MalformedFrameError,
    PageHeader,
)

TID = bytes(range(16))
COMMON = struct.Struct("<4sHBB16s")
PAGE = struct.Struct("<HHIHHHBQI")


def page_header(payload: bytes | None = None, **overrides: object) -> PageHeader:
    fields: dict[str, object] = dict(
        transfer_id=TID,
        layer_start=2,
        layer_end=4,
        block_ids=(7, 3, 11),
        block_size=4,
        num_kv_heads=2,
        head_dim=8,
        dtype=torch.float16,
        payload_nbytes=2 * 2 * 3 * 4 * 2 * 8 * 2,
        crc32=wire.checksum(payload) if payload is not None else 0xDEADBEEF,
    )
    fields.update(overrides)
    return PageHeader(**fields)  # type: ignore[arg-type]


def page_frame(
    *,
    magic: bytes = wire.MAGIC,
    version: int = wire.PROTOCOL_VERSION,
    kind: int = wire.FrameKind.PAGE,
    flags: int = wire.FLAG_CHECKSUM,
    layers: tuple[int, int] = (0, 1),
    num_blocks: int = 2,
    block_ids: tuple[int, ...] = (0, 1),
    dims: tuple[int, int, int] = (4, 2, 8),
    dtype_code: int = 1,
    nbytes: int | None = None,
    crc: int = 0,
) -> bytes:
    """A PAGE header built by hand, so that each field can be wrong on its own."""
    if nbytes is None:
        nbytes = (layers[1] - layers[0]) * 2 * num_blocks * dims[0] * dims[1] * dims[2] * 4
    common = COMMON.pack(magic, version, kind, flags, TID)
    body = PAGE.pack(layers[0], layers[1], num_blocks, *dims, dtype_code, nbytes, crc)
    return common + body + struct.pack(f"<{len(block_ids)}I", *block_ids)


# -- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("crc", [None, 0, 0xFFFFFFFF, 12345])
def test_page_round_trip(dtype: torch.dtype, crc: int | None) -> None:
    size = torch.empty((), dtype=dtype).element_size()
    header = page_header(dtype=dtype, payload_nbytes=2 * 2 * 3 * 4 * 2 * 8 * size, crc32=crc)
    decoded = wire.decode(wire.encode(header))
    assert decoded == header
    assert isinstance(decoded, PageHeader)
    assert decoded.shape == (2, 2, 3, 4, 2, 8)


def test_page_round_trip_through_memoryview() -> None:
    header = page_header()
    assert wire.decode(memoryview(wire.encode(header))) == header


def test_done_round_trip() -> None:
    header = DoneHeader(TID, first_token_id=49151, num_layers=30)
    assert wire.decode(wire.encode(header)) == header


@pytest.mark.parametrize("reason", ["", "prefill worker died", "ünïcödé ✓"])
def test_abort_round_trip(reason: str) -> None:
    header = AbortHeader(TID, reason)
    assert wire.decode(wire.encode(header)) == header


@pytest.mark.parametrize("status", list(AckStatus))
@pytest.mark.parametrize("message", ["", "unknown transfer", "ünïcödé"])
def test_ack_round_trip(status: AckStatus, message: str) -> None:
    header = AckHeader(TID, status, message)
    assert wire.decode(wire.encode(header)) == header


def test_long_messages_are_capped() -> None:
    decoded = wire.decode(wire.encode(AbortHeader(TID, "x" * 5000)))
    assert isinstance(decoded, AbortHeader) and decoded.reason == "x" * 1024
    decoded = wire.decode(wire.encode(AckHeader(TID, AckStatus.FAILED, "y" * 5000)))
    assert isinstance(decoded, AckHeader) and decoded.message == "y" * 1024


def test_transfer_id_must_be_16_bytes() -> None:
    with pytest.raises(ValueError):
        wire.encode(DoneHeader(b"short", 1, 1))


def test_hand_built_frame_decodes() -> None:
    header = wire.decode(page_frame())
    assert isinstance(header, PageHeader)
    assert (header.block_ids, header.dtype, header.crc32) == ((0, 1), torch.float32, 0)


# -- rejections -----------------------------------------------------------------------------


def test_short_header() -> None:
    frame = wire.encode(DoneHeader(TID, 1, 1))
    for cut in (0, 3, COMMON.size - 1):
        with pytest.raises(MalformedFrameError, match="shorter"):
            wire.decode(frame[:cut])


def test_bad_magic() -> None:
    with pytest.raises(MalformedFrameError, match="magic"):
        wire.decode(page_frame(magic=b"PDKX"))


@pytest.mark.parametrize("version", [0, 2, 0xFFFF])
def test_wrong_version(version: int) -> None:
    with pytest.raises(MalformedFrameError, match="version"):
        wire.decode(page_frame(version=version))


@pytest.mark.parametrize("kind", [0, 5, 255])
def test_unknown_kind(kind: int) -> None:
    with pytest.raises(MalformedFrameError, match="kind"):
        wire.decode(page_frame(kind=kind))


def test_short_page_body() -> None:
    frame = page_frame()
    with pytest.raises(MalformedFrameError, match="shorter"):
        wire.decode(frame[: COMMON.size + PAGE.size - 1])


def test_truncated_block_id_list() -> None:
    frame = page_frame(num_blocks=3, block_ids=(0, 1, 2))
    for cut in (1, 4, 5):
        with pytest.raises(MalformedFrameError, match="block ids"):
            wire.decode(frame[:-cut])


def test_extra_block_ids() -> None:
    with pytest.raises(MalformedFrameError, match="block ids"):
        wire.decode(page_frame(num_blocks=2, block_ids=(0, 1, 2)))


@pytest.mark.parametrize("num_blocks", [0, wire.MAX_BLOCKS_PER_PAGE + 1])
def test_block_count_out_of_range(num_blocks: int) -> None:
    with pytest.raises(MalformedFrameError, match="blocks"):
        wire.decode(page_frame(num_blocks=num_blocks, block_ids=(), nbytes=0))


@pytest.mark.parametrize("delta", [-1, 1, 1 << 40])
def test_payload_size_disagreeing_with_shape(delta: int) -> None:
    nbytes = 1 * 2 * 2 * 4 * 2 * 8 * 4
    with pytest.raises(MalformedFrameError, match="payload bytes"):
        wire.decode(page_frame(nbytes=nbytes + delta))


@pytest.mark.parametrize("code", [0, 4, 255])
def test_unknown_dtype(code: int) -> None:
    with pytest.raises(MalformedFrameError, match="dtype"):
        wire.decode(page_frame(dtype_code=code))


@pytest.mark.parametrize("layers", [(3, 3), (4, 2)])
def test_empty_layer_range(layers: tuple[int, int]) -> None:
    with pytest.raises(MalformedFrameError, match="layer range"):
        wire.decode(page_frame(layers=layers, nbytes=64))


@pytest.mark.parametrize("dims", [(0, 2, 8), (4, 0, 8), (4, 2, 0)])
def test_zero_dims(dims: tuple[int, int, int]) -> None:
    with pytest.raises(MalformedFrameError, match="zero"):
        wire.decode(page_frame(dims=dims, nbytes=0))


def test_done_with_wrong_body_size() -> None:
    frame = wire.encode(DoneHeader(TID, 1, 2))
    for bad in (frame[:-1], frame + b"\0"):
        with pytest.raises(MalformedFrameError, match="DONE"):
            wire.decode(bad)


def test_ack_without_status() -> None:
    frame = COMMON.pack(wire.MAGIC, wire.PROTOCOL_VERSION, wire.FrameKind.ACK, 0, TID)
    with pytest.raises(MalformedFrameError, match="ACK"):
        wire.decode(frame)


def test_ack_with_unknown_status() -> None:
    frame = COMMON.pack(wire.MAGIC, wire.PROTOCOL_VERSION, wire.FrameKind.ACK, 0, TID) + b"\x07"
    with pytest.raises(MalformedFrameError, match="status"):
        wire.decode(frame)


# -- payload verification -------------------------------------------------------------------


def payload_and_header(crc: bool = True) -> tuple[bytearray, PageHeader]:
    tensor = torch.arange(2 * 2 * 3 * 4 * 2 * 8, dtype=torch.float16)
    payload = bytearray(tensor.numpy().tobytes())
    header = page_header(bytes(payload) if crc else None)
    if not crc:
        header = page_header(crc32=None)
    assert header.payload_nbytes == len(payload)
    return payload, header


def test_verify_accepts_the_right_payload() -> None:
    payload, header = payload_and_header()
    wire.verify_payload(header, memoryview(payload))
    decoded = wire.decode(wire.encode(header))
    assert isinstance(decoded, PageHeader)
    wire.verify_payload(decoded, memoryview(payload))


@pytest.mark.parametrize("index", [0, 100, -1])
def test_verify_catches_a_flipped_byte(index: int) -> None:
    payload, header = payload_and_header()
    payload[index] ^= 0x10
    with pytest.raises(MalformedFrameError, match="checksum"):
        wire.verify_payload(header, memoryview(payload))


def test_verify_catches_a_truncated_payload() -> None:
    payload, header = payload_and_header()
    with pytest.raises(MalformedFrameError, match="payload of"):
        wire.verify_payload(header, memoryview(payload)[:-1])
    with pytest.raises(MalformedFrameError, match="payload of"):
        wire.verify_payload(header, memoryview(payload + b"\0"))


def test_checksum_off_checks_size_only() -> None:
    payload, header = payload_and_header(crc=False)
    decoded = wire.decode(wire.encode(header))
    assert isinstance(decoded, PageHeader) and decoded.crc32 is None
    payload[5] ^= 0xFF
    wire.verify_payload(decoded, memoryview(payload))  # no checksum to catch it
    with pytest.raises(MalformedFrameError, match="payload of"):
        wire.verify_payload(decoded, memoryview(payload)[:-2])


def test_verification_can_skip_the_checksum_but_not_the_size() -> None:
    payload, header = payload_and_header()
    payload[3] ^= 0x01
    wire.verify_payload(header, memoryview(payload), verify_checksum=False)
    with pytest.raises(MalformedFrameError, match="checksum"):
        wire.verify_payload(header, memoryview(payload))
    with pytest.raises(MalformedFrameError, match="payload of"):
        wire.verify_payload(header, memoryview(payload)[:-1], verify_checksum=False)


def test_checksum_flag_governs_crc_presence() -> None:
    frame = bytearray(page_frame(crc=1234))
    decoded = wire.decode(bytes(frame))
    assert isinstance(decoded, PageHeader) and decoded.crc32 == 1234
    frame[7] = 0  # clear the flags byte: the crc field is ignored
    decoded = wire.decode(bytes(frame))
    assert isinstance(decoded, PageHeader) and decoded.crc32 is None


def test_checksum_is_unsigned_crc32() -> None:
    assert wire.checksum(b"") == 0
    assert wire.checksum(b"123456789") == 0xCBF43926  # the CRC-32 check value
