"""How page bytes move once the control channel has said which pages go where.

:class:`Backend` names the ways (both ends' fingerprints must agree on one). Every out-of-band
backend is a :class:`PairLink` per (prefill, decode) pair whose payloads arrive in the order
sent: offered by the decode side's :class:`PairHost` (``offer`` goes into WELCOME, ``accept``
blocks until the peer joins) and joined by the sender's :func:`join_pair`.
"""

from __future__ import annotations

import datetime
import hmac
import os
import socket
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
    return GroupHost(backend, host, timeout_s, prove)


class GroupHost(PairHost):
    """The store that pairs rendezvous on, and the groups made on it: the decode worker hosts
    a ``TCPStore`` and each WELCOME names a fresh token; both ends build a two-rank group on
    the store under a key prefix derived from it.

    torch's ``TCPStore`` has no authentication (and lists its keys to anyone who asks), so:

    - it is confined: it listens on ``host`` only (the worker's KV address; torch's own
      listener would take every interface), through a socket made here;
    - its key prefix is secret on a keyed channel: ``prove(token)`` (an HMAC under a key
      derived from the fleet key), so a token read off the wire does not name it;
    - the pair is authenticated over the group itself before any page moves: the decode side
      sends a random challenge, the joiner must answer ``prove(challenge)``
      (:func:`_challenge`, :func:`_answer`), so a peer that slipped into the rendezvous
      without the fleet key is refused. Without a key only the confinement holds.
    """

    def __init__(self, backend: Backend, host: str, timeout_s: float, prove: Prove = bytes) -> None:
        self.backend = backend
        self.host = host
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._prove = prove
        self._store: dist.TCPStore | None = None

    def close(self) -> None:
        self._store = None  # the TCPStore's server stops when the last reference goes

    def offer(self) -> dict[str, object]:
        if self._store is None:
            self._store = _confined_store(self.host, self.timeout)
        return {
            "store_host": self.host,
            "store_port": self._store.port,
            "token": os.urandom(PAIR_TOKEN_BYTES).hex(),
        }

    def accept(self, offer: dict[str, object]) -> PairLink:
        assert self._store is not None
        store = dist.PrefixStore(_store_prefix(offer, self._prove), self._store)
        link = GroupLink(make_group(self.backend, store, 0, self.timeout), 1)
        _challenge(link, self.backend, self._prove)
        return link


PAIR_TOKEN_BYTES = 16


def _confined_store(host: str, timeout: datetime.timedelta) -> dist.TCPStore:
    """A master ``TCPStore`` listening on ``host`` only (an ephemeral port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind((host, 0))
        listener.listen(64)
    except OSError:
        listener.close()
        raise
    port = listener.getsockname()[1]
    return dist.TCPStore(  # takes the socket over (and closes it when it stops)
        host,
        port,
        is_master=True,
        wait_for_workers=False,
        timeout=timeout,
        master_listen_fd=listener.detach(),
    )


def _store_prefix(offer: dict[str, object], prove: Prove) -> str:
    token = bytes.fromhex(str(offer["token"]))
    if len(token) != PAIR_TOKEN_BYTES:
        raise ValueError("pair offer carries a malformed token")
    return prove(token).hex() + "/"


def _device(backend: Backend) -> torch.device:
    if backend is Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _challenge(link: GroupLink, backend: Backend, prove: Prove) -> None:
    """Decode side: refuse the pair unless its peer answers a fresh challenge with its
    proof (it holds the fleet key)."""
    challenge = os.urandom(PAIR_TOKEN_BYTES)
    device = _device(backend)
    link.send(torch.frombuffer(bytearray(challenge), dtype=torch.uint8).to(device))
    answer = link.receive((PAIR_TOKEN_BYTES,), torch.uint8, device).cpu().numpy().tobytes()
    if not hmac.compare_digest(answer, prove(challenge)):
        raise PairLinkError("pair group: the peer could not prove the fleet key")


def _answer(link: GroupLink, backend: Backend, prove: Prove) -> None:
    """Joiner side: answer the decode side's challenge with its proof."""
    device = _device(backend)
    challenge = link.receive((PAIR_TOKEN_BYTES,), torch.uint8, device).cpu().numpy().tobytes()
    proof = prove(challenge)
    link.send(torch.frombuffer(bytearray(proof), dtype=torch.uint8).to(device))


def join_pair(
    backend: Backend, offer: dict[str, object], timeout_s: float, prove: Prove = bytes
) -> PairLink:
    """Sender side: join the pair the decode worker offered in its WELCOME (and, for a pair
    group, answer its challenge)."""
    if backend is Backend.STREAM:
        return join_stream(offer, timeout_s, prove)
    prefix = _store_prefix(offer, prove)
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        str(offer["store_host"]), int(str(offer["store_port"])), is_master=False, timeout=timeout
    )
    link = GroupLink(make_group(backend, dist.PrefixStore(prefix, store), 1, timeout), 0)
    _answer(link, backend, prove)
    return link


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
