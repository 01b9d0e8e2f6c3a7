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


class BackendDeviceError(ValueError):
    """``--kv-backend`` cannot move KV pages held where this worker holds them (``--device``):
    refused at start, like any other contradictory setting (exit status 2)."""


def device_refusal(backend: Backend, device_type: str, nccl_available: bool = True) -> str | None:
    """Why ``backend`` cannot carry the pages of a KV cache on a ``device_type`` (``"cpu"``,
    ``"cuda"``) device, or None when it can; ``nccl_available``: whether this torch build has
    NCCL. zmq and stream stage pages through the host, so they carry any device's."""
    if backend is Backend.NCCL:
        if device_type != "cuda":
            return (
                f"--kv-backend nccl moves CUDA tensors, but this worker's KV cache is on "
                f"{device_type} (--device; auto means cpu when torch sees no GPU): use "
                "--kv-backend zmq or stream, or run the workers on GPUs"
            )
        if not nccl_available:
            return (
                "--kv-backend nccl needs a torch build with NCCL "
                "(torch.distributed.is_nccl_available() is False here): use zmq or stream"
            )
    if backend is Backend.GLOO and device_type != "cpu":
        return (
            f"--kv-backend gloo moves CPU tensors only and stages nothing through the host, "
            f"but this worker's KV cache is on {device_type}: use --kv-backend nccl between "
            "GPUs, or zmq or stream (they copy pages through the host)"
        )
    return None


class Streaming(enum.Enum):
    LAYERWISE = "layerwise"  # push each layer's pages as soon as that layer is computed
    AFTER_PREFILL = "after-prefill"  # push everything once the prefill is done (comparison)
