"""How page bytes move once the control channel has said which pages go where.

- ``zmq``: the payload is the second frame of the PAGE message (zero-copy on both ends).
- ``gloo`` / ``nccl``: the payload goes out of band over a torch.distributed process group
  made for this one pair of workers on demand: the decode worker hosts a ``TCPStore`` and names a
  fresh key prefix in its WELCOME, both ends build a two-rank group on it. No global world, no
  fixed world size: workers join and leave without restarting the fleet.
"""

from __future__ import annotations

import datetime
import enum
import os
from typing import Any, TypeAlias

import torch
import torch.distributed as dist


class Backend(enum.Enum):
    ZMQ = "zmq"
    GLOO = "gloo"  # CPU tensors
    NCCL = "nccl"  # CUDA tensors; untested without a GPU pair

    @property
    def out_of_band(self) -> bool:
        return self is not Backend.ZMQ


# A two-rank group, rank 0 the decode worker, rank 1 the prefill worker: a ProcessGroupGloo or
# ProcessGroupNCCL (typed Any: torch's stubs for them lack send/recv).
PairGroup: TypeAlias = Any
PAYLOAD_TAG = 0  # pages of one pair arrive in order; gloo/nccl match sends and recvs per tag


class PairGroupHost:
    """Decode side: the store that pairs rendezvous on, and the groups made on it."""

    def __init__(self, backend: Backend, host: str, timeout_s: float) -> None:
        self.backend = backend
        self.host = host
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._store: dist.TCPStore | None = None

    def close(self) -> None:
        self._store = None  # the TCPStore's server stops when the last reference goes

    def offer(self) -> dict[str, object]:
        """Rendezvous details for one new peer (goes into WELCOME)."""
        if self._store is None:
            self._store = dist.TCPStore(
                self.host, 0, is_master=True, wait_for_workers=False, timeout=self.timeout
            )
        return {
            "store_host": self.host,
            "store_port": self._store.port,
            "prefix": os.urandom(8).hex(),
        }

    def accept(self, offer: dict[str, object]) -> PairGroup:
        """Build this side (rank 0) of the pair group; blocks until the peer joins."""
        assert self._store is not None
        return make_group(
            self.backend, dist.PrefixStore(f"{offer['prefix']}/", self._store), 0, self.timeout
        )


def join_pair(backend: Backend, offer: dict[str, object], timeout_s: float) -> PairGroup:
    """Sender side (rank 1): connect to the decode worker's store and build the pair group."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        str(offer["store_host"]), int(str(offer["store_port"])), is_master=False, timeout=timeout
    )
    return make_group(backend, dist.PrefixStore(f"{offer['prefix']}/", store), 1, timeout)


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


def send_tensor(group: PairGroup, tensor: torch.Tensor, peer_rank: int) -> None:
    group.send([tensor.contiguous()], peer_rank, PAYLOAD_TAG).wait()


def recv_tensor(
    group: PairGroup,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    peer_rank: int,
) -> torch.Tensor:
    buffer = torch.empty(shape, dtype=dtype, device=device)
    group.recv([buffer], peer_rank, PAYLOAD_TAG).wait()
    return buffer


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes without a copy (for tags and in-band frames)."""
    raw = tensor.contiguous().view(torch.uint8).numpy()
    return memoryview(raw).cast("B")  # type: ignore[arg-type]
