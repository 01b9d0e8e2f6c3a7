"""How page bytes move once the control channel has said which pages go where.

:class:`Backend` names the ways (both ends' fingerprints must agree on one). Every out-of-band
backend is a :class:`PairLink` per (prefill, decode) pair whose payloads arrive in the order
sent: offered by the decode side's :class:`PairHost` (``offer`` goes into WELCOME, ``accept``
blocks until the peer joins) and joined by the sender's :func:`join_pair`.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, TypeAlias

import torch
import torch.distributed as dist

from kvtransfer.frame_auth import FrameAuth
from kvtransfer.modes import Backend as Backend
from kvtransfer.pair_link import PairHost as PairHost
from kvtransfer.pair_link import PairLink as PairLink
from kvtransfer.pair_link import PairLinkError as PairLinkError
from kvtransfer.pair_link import tensor_bytes as tensor_bytes
from kvtransfer.stream_link import RECORD as RECORD
from kvtransfer.stream_link import Prove, join_stream
from kvtransfer.stream_link import StreamHost as StreamHost
from kvtransfer.stream_link import StreamLink as StreamLink

# A two-rank group, rank 0 the decode worker, rank 1 the prefill worker: a ProcessGroupGloo or
# ProcessGroupNCCL (typed Any: torch's stubs for them lack send/recv).
PairGroup: TypeAlias = Any
PAYLOAD_TAG = 0  # pages of one pair arrive in order; gloo/nccl match sends and recvs per tag


class GroupLink(PairLink):
    def __init__(self, group: PairGroup, peer_rank: int) -> None:
        self.group = group
        self.peer_rank = peer_rank

    def send(self, tensor: torch.Tensor) -> None:
        self.group.send([tensor.contiguous()], self.peer_rank, PAYLOAD_TAG).wait()

    def receive(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype, device=device)
        self.group.recv([buffer], self.peer_rank, PAYLOAD_TAG).wait()
        return buffer


def refuse_encryption(backend: Backend, auth: FrameAuth) -> None:
    """Raise ValueError if ``auth`` encrypts and ``backend`` cannot carry ciphertext: gloo and
    nccl hand the page tensor itself to torch.distributed (on a GPU, without a host copy)."""
    if auth.encrypt and backend in (Backend.GLOO, Backend.NCCL):
        raise ValueError(
            f"encrypted KV pages cannot travel over {backend.value}: use zmq or stream"
        )


def make_host(
    backend: Backend,
    host: str,
    timeout_s: float,
    unix_path: str | None,
    stream_port: int = 0,
    prove: Prove = bytes,
) -> PairHost:
    """The decode side's host for an out-of-band backend. ``unix_path``: where the stream
    backend listens when the control channel is ipc (None: tcp on ``host``, port
    ``stream_port``; 0 takes an ephemeral one); ``prove``: how a joiner proves its token."""
    if backend is Backend.STREAM:
        return StreamHost(host, timeout_s, unix_path, stream_port, prove)
    return GroupHost(backend, host, timeout_s)


class GroupHost(PairHost):
    """The store that pairs rendezvous on, and the groups made on it: the decode worker hosts
    a ``TCPStore`` and names a fresh key prefix in each WELCOME, both ends build a two-rank
    group on it."""

    def __init__(self, backend: Backend, host: str, timeout_s: float) -> None:
        self.backend = backend
        self.host = host
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._store: dist.TCPStore | None = None

    def close(self) -> None:
        self._store = None  # the TCPStore's server stops when the last reference goes

    def offer(self) -> dict[str, object]:
        if self._store is None:
            self._store = dist.TCPStore(
                self.host, 0, is_master=True, wait_for_workers=False, timeout=self.timeout
            )
        return {
            "store_host": self.host,
            "store_port": self._store.port,
            "prefix": os.urandom(8).hex(),
        }

    def accept(self, offer: dict[str, object]) -> PairLink:
        assert self._store is not None
        store = dist.PrefixStore(f"{offer['prefix']}/", self._store)
        return GroupLink(make_group(self.backend, store, 0, self.timeout), 1)


def join_pair(
    backend: Backend, offer: dict[str, object], timeout_s: float, prove: Prove = bytes
) -> PairLink:
    """Sender side: join the pair the decode worker offered in its WELCOME."""
    if backend is Backend.STREAM:
        return join_stream(offer, timeout_s, prove)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        str(offer["store_host"]), int(str(offer["store_port"])), is_master=False, timeout=timeout
    )
    group = make_group(backend, dist.PrefixStore(f"{offer['prefix']}/", store), 1, timeout)
    return GroupLink(group, 0)


def make_group(
    backend: Backend, store: dist.Store, rank: int, timeout: datetime.timedelta
) -> PairGroup:
    if backend is Backend.GLOO:
        return dist.ProcessGroupGloo(store, rank, 2, timeout)
    if backend is Backend.NCCL:
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, options)
    raise ValueError(f"{backend.value} has no process group")
