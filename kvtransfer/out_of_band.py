"""Decode side of the out-of-band backends: taking payloads off a pair's own channel.

- ``stream``: :func:`take_record` reads the next record (a frame and its payload, see
  ``kvtransfer.datapath``) off the peer's stream socket. An out-of-band PAGE lands in its
  reserved blocks as it is read (:meth:`PageWriter.write_in_place`); a page that cannot land so
  (unknown transfer, a page that does not fit its reservation) is read aside and judged whole.
  A frame that fails decoding, or does not belong on a stream, is counted and its payload
  skipped, so the stream stays in step with the sender.
- ``gloo`` / ``nccl``: the header comes on the ROUTER; :func:`take_group_payload` takes the
  payload that follows it off the pair group, and :func:`skip_group_payload` the payload of a
  header that was refused.
"""

from __future__ import annotations

import torch

from kvtransfer import wire
from kvtransfer.datapath import PairLink, PairLinkError, StreamLink, tensor_bytes
from kvtransfer.page_writer import PageWriter

Taken = tuple[wire.Header, memoryview | None]
"""A frame to apply to its transfer, with the payload read aside (pages that could not land
in place) or None."""


def take_record(
    link: StreamLink, auth: wire.FrameAuth, writer: PageWriter, sender: str
) -> Taken | None:
    """Read one record off ``sender``'s ``link``; None when it is fully handled here (a page
    written in place, or a frame dropped and counted). Raises :class:`PairLinkError` if the
    stream breaks or stalls (the peer must then handshake again)."""
    frame, payload_len = link.read_record()
    stats = writer.stats
    try:
        header = wire.decode(frame, auth)  # a PAGE's tag is checked with its payload
    except wire.MalformedFrameError as exc:
        writer.refuse(exc)
        link.discard(payload_len)
        return None
    if isinstance(header, wire.HandshakeHeader):
        stats.drop("unexpected_handshake")
        link.discard(payload_len)
        return None
    if not isinstance(header, wire.PageHeader):
        if payload_len:
            stats.drop("malformed")  # DONE, ABORT, ACK carry no payload
            link.discard(payload_len)
            return None
        return header, None
    if not header.out_of_band:
        stats.drop("malformed")  # pages on a stream say so
        link.discard(payload_len)
        return None
    if writer.write_in_place(link, header, frame, payload_len, sender):
        return None
    payload = link.read_bytes(payload_len)  # cannot land in place: read aside, then judge
    return (header, payload) if writer.verified(frame, payload) else None


def take_group_payload(
    link: PairLink,
    header: wire.PageHeader,
    frame: memoryview,
    writer: PageWriter,
) -> torch.Tensor | None:
    """The payload that follows an out-of-band PAGE header, taken off the pair group (always,
    to stay in step with the sender) and authenticated together with the header; None when
    it does not verify (counted). A payload received on a GPU is authenticated by its header
    alone: hashing it would cost a device copy. Raises :class:`PairLinkError`."""
    pages = link.receive(header.shape, header.dtype, writer.kv.device)
    data = tensor_bytes(pages) if pages.device.type == "cpu" else None
    return pages if writer.verified(frame, data) else None


def skip_group_payload(link: PairLink | None, frame: memoryview) -> None:
    """Take the payload of a refused out-of-band PAGE header off the pair group, so the sender
    is not left blocked. Raises :class:`PairLinkError` when that cannot be done (no group, or a
    header whose payload size cannot be trusted: the pair cannot be resynchronised)."""
    nbytes = wire.out_of_band_payload_size(frame)
    if nbytes is None or link is None:
        raise PairLinkError("unreadable out-of-band page header")
    link.discard(nbytes)
