"""The KV channel's settings (flags and ``PDSERVE_*`` variables), declared once, and the
:class:`~kvtransfer.config.TransferConfig` built from them.

Torch-free, so ``pdserve``'s parser can declare them: the backend and streaming choices come
from :mod:`kvtransfer.modes`, and the configuration's modules (torch) are imported when it is
built. The key comes from ``--kv-key-file`` or ``PDSERVE_KV_KEY``, never from a flag's value.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from core.settings import Group, Setting, env_value
from kvtransfer.modes import (
    Backend,
    BackendDeviceError,
    Streaming,
    device_refusal,
    encryption_refusal,
)

if TYPE_CHECKING:
    from kvtransfer.config import TransferConfig

KEY_ENV = "PDSERVE_KV_KEY"
BACKENDS = tuple(b.value for b in Backend)
STREAMING = tuple(s.value for s in Streaming)

TRANSFER = Group(
    "KV transfer",
    (
        Setting(
            "--kv-backend",
            choices=BACKENDS,
            default="zmq",
            help="how page bytes move: zmq (in ZeroMQ frames, tcp/ipc), stream (ZeroMQ "
            "control, pages over a direct socket read straight into the KV pool: fastest on "
            "CPU), gloo (torch.distributed, CPU), nccl (torch.distributed, GPU); both tiers "
            "must agree",
        ),
        Setting(
            "--kv-streaming",
            choices=STREAMING,
            default="layerwise",
            help="push each layer's pages as it is computed, or all after the prefill",
        ),
        Setting(
            "--kv-key-file",
            type=Path,
            help=f"file holding the fleet's KV channel secret (or set {KEY_ENV}); every frame "
            "is MACed with keys derived from it (HKDF-SHA256)",
        ),
        Setting(
            "--kv-insecure",
            field="insecure",
            switch=True,
            help="run the KV channel without a key (local development only)",
        ),
        Setting(
            "--kv-encrypt",
            field="encrypt",
            switch=True,
            help="encrypt KV page payloads (AES-256-GCM under a key derived from the fleet's "
            "key; needs --kv-key-file, and --kv-backend zmq or stream): pages reveal the "
            "prompts, so use it when they cross an untrusted network; both tiers must agree",
        ),
        Setting(
            "--no-kv-checksum",
            switch=True,
            help="without a key, skip the per-frame XXH3-64 checksum",
        ),
        Setting(
            "--kv-max-queued-mb",
            type=int,
            default=512,
            help="pages queued per decode peer before the prefill worker waits",
        ),
        Setting(
            "--kv-ack-timeout",
            field="ack_timeout_s",
            type=float,
            default=30.0,
            help="seconds a transfer may wait for its acknowledgement",
        ),
        Setting(
            "--kv-handshake-timeout",
            field="handshake_timeout_s",
            type=float,
            default=10.0,
            help="seconds a new KV connection may wait for the decode worker's WELCOME (and a "
            "torch.distributed pair group for its peer)",
        ),
    ),
)


def check_flags(args: argparse.Namespace, keyed: bool, device: str = "auto") -> None:
    """Raise ValueError for a combination of the channel's flags that no worker could start
    with (torch-free: a launcher checks before it starts any; ``keyed``: whether the workers
    will have the fleet key, which a launcher may generate; ``device``: the workers'
    ``--device``, checked against the backend unless ``auto``, which only a worker resolves:
    :class:`~kvtransfer.modes.BackendDeviceError`)."""
    backend = Backend(args.kv_backend)
    refusal = encryption_refusal(args.kv_encrypt, keyed, backend)
    if refusal is not None:
        raise ValueError(refusal)
    if device != "auto":
        refusal = device_refusal(backend, device.split(":")[0])
        if refusal is not None:
            raise BackendDeviceError(refusal)


def transfer_config(args: argparse.Namespace) -> TransferConfig:
    """The channel's configuration (imports torch: call it in a worker process)."""
    from kvtransfer.config import TransferConfig

    key = env_value(KEY_ENV)
    if args.kv_key_file:
        key = Path(args.kv_key_file).read_text().strip()
    return TransferConfig(
        **TRANSFER.fields(args),
        backend=Backend(args.kv_backend),
        key=key.encode() if key else None,
        checksum=not args.no_kv_checksum,
        streaming=Streaming(args.kv_streaming),
        max_queued_bytes=int(args.kv_max_queued_mb) << 20,
    )
