"""How KV pages move (:class:`Backend`) and when they leave (:class:`Streaming`): plain enums,
torch-free, so the flags that choose them are declared from them (``kvtransfer.settings``).
Both tiers must agree on the backend; it is part of the fingerprint."""

from __future__ import annotations

import enum


class Backend(enum.Enum):
    # The payload is the second frame of the PAGE message (zero-copy on both ends; the receiver
    # copies it from ZeroMQ's message into the reserved blocks).
    ZMQ = "zmq"
    # After the handshake (on ZeroMQ), a transfer's frames (PAGE with its payload, DONE, ABORT)
    # go as records on a plain stream socket made for this one pair (tcp, or a unix socket when
    # the control endpoint is ipc; ``kvtransfer.stream_link``), and the receiver reads each
    # payload straight into the reserved blocks: the kernel's copy is the only one on the
    # receiving side (libzmq owns its receive buffer, so ZeroMQ forces a second copy into the
    # pool), and no ZeroMQ I/O thread hand-off is paid per page. Acks return on ZeroMQ.
    STREAM = "stream"
    # The payload goes over a torch.distributed two-rank group made for this one pair on
    # demand (see GroupHost): no global world, no fixed world size, so workers join and leave
    # without restarting the fleet.
    GLOO = "gloo"  # CPU tensors
    NCCL = "nccl"  # CUDA tensors; untested without a GPU pair

    @property
    def out_of_band(self) -> bool:
        return self is not Backend.ZMQ


def encryption_refusal(encrypt: bool, keyed: bool, backend: Backend) -> str | None:
    """Why ``--kv-encrypt`` cannot run with this key and backend, or None when it can."""
    if not encrypt:
        return None
    if not keyed:
        return "--kv-encrypt needs the fleet's key (--kv-key-file or PDSERVE_KV_KEY)"
    if backend in (Backend.GLOO, Backend.NCCL):
        return (
            f"--kv-encrypt is not available with --kv-backend {backend.value}: its payloads "
            "go through torch.distributed unencrypted; use zmq or stream"
        )
    return None


class Streaming(enum.Enum):
    LAYERWISE = "layerwise"  # push each layer's pages as soon as that layer is computed
    AFTER_PREFILL = "after-prefill"  # push everything once the prefill is done (comparison)
