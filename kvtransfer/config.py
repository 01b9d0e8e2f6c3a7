"""How a worker's end of the KV channel is set up (built at the entry point, passed down)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.ticket import Fingerprint
from engine.device import select_device
from engine.kv_cache import KVCache
from engine.model_files import ModelSpec
from kvtransfer import wire
from kvtransfer.modes import Backend as Backend
from kvtransfer.modes import BackendDeviceError as BackendDeviceError
from kvtransfer.modes import Streaming as Streaming
from kvtransfer.modes import device_refusal, encryption_refusal


@dataclass(frozen=True)
class TransferConfig:
    backend: Backend = Backend.ZMQ
    key: bytes | None = None
    """Shared secret of the fleet: every frame is MACed with keys derived from it (HKDF-SHA256,
    ``kvtransfer.keys``). None only with ``insecure``."""
    insecure: bool = False
    """Run without a key (local development only); frames then carry an XXH3-64 checksum at most."""
    checksum: bool = True
    encrypt: bool = False
    """Encrypt page payloads (AES-256-GCM under a key derived from the fleet key): needs the
    key, and a backend that carries payloads through the host (zmq, stream)."""
    streaming: Streaming = Streaming.LAYERWISE
    max_queued_bytes: int = 512 << 20
    ack_timeout_s: float = 30.0
    handshake_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.key is None and not self.insecure:
            raise ValueError(
                "the KV channel needs the fleet's key (--kv-key-file or PDSERVE_KV_KEY); "
                "pass --kv-insecure to run without one (local development only)"
            )
        refusal = encryption_refusal(self.encrypt, self.key is not None, self.backend)
        if refusal is not None:
            raise ValueError(refusal)

    def auth(self) -> wire.FrameAuth:
        return wire.FrameAuth(self.key, self.checksum, self.encrypt)

    @property
    def integrity(self) -> str:
        """How frames are protected; both ends must agree (it is part of the fingerprint)."""
        return self.auth().integrity


def fingerprint_for(spec: ModelSpec, kv: KVCache, transfer: TransferConfig) -> Fingerprint:
    return Fingerprint(
        model=spec.fingerprint,
        dtype=str(kv.dtype).removeprefix("torch."),
        block_size=kv.block_size,
        num_layers=kv.num_layers,
        num_kv_heads=kv.num_kv_heads,
        head_dim=kv.head_dim,
        backend=transfer.backend.value,
        integrity=transfer.integrity,
        weights=spec.weights,
    )


def check_backend_device(backend: Backend, device: str | torch.device) -> None:
    """Raise :class:`BackendDeviceError` when ``backend`` cannot move the pages of a KV cache
    on ``device``: a ``--device`` value (``auto`` resolved as the engine will resolve it) or
    the cache's own device. Both tiers call it at start, before loading the model."""
    where = select_device(device) if isinstance(device, str) else device
    refusal = device_refusal(backend, where.type, dist.is_nccl_available())
    if refusal is not None:
        raise BackendDeviceError(refusal)
