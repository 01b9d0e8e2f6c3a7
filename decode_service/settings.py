"""The decode worker's settings (flags and ``PDSERVE_*`` variables), declared once, and the
:class:`~decode_service.worker.DecodeConfig` built from them. Torch-free to import (``pdserve``'s
parser declares them); building the configuration imports the worker.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from core.settings import Group, Setting, port
from engine.settings import ENGINE, MODEL, engine_config
from kvtransfer.settings import TRANSFER, transfer_config
from server_runtime.settings import DRAIN, LOG, METRICS_PORT, SERVER_TLS
from server_runtime.worker_settings import WORKER_ADMISSION

if TYPE_CHECKING:
    from decode_service.worker import DecodeConfig

SERVER = Group(
    None,
    (
        Setting("--listen", field="listen", default="127.0.0.1:50071"),
        Setting(
            "--kv-bind",
            field="kv_bind",
            default="tcp://127.0.0.1:0",
            help="ZeroMQ endpoint for incoming KV pages (tcp://host:port, ipc:///path)",
        ),
        Setting(
            "--kv-advertise",
            field="kv_advertise",
            help="endpoint prefill workers should connect to (default: the bound one)",
        ),
        Setting(
            "--kv-stream-port",
            field="kv_stream_port",
            type=port,
            default=0,
            help="--kv-backend stream over tcp: the port the page listener binds on the "
            "advertised host (default 0: an ephemeral one, announced in each handshake)",
        ),
        Setting(
            "--kv-lease-seconds",
            field="kv_lease_s",
            type=float,
            default=60.0,
            help="free a reservation whose pages have not all arrived by then",
        ),
        Setting(
            "--no-migration",
            switch=True,
            help="on SIGTERM, let streams finish here within --shutdown-grace instead of "
            "moving each running sequence, KV and all, to another decode worker",
        ),
        METRICS_PORT.with_default(9102),
    ),
)

GROUPS = (SERVER, TRANSFER, MODEL, ENGINE, LOG, SERVER_TLS, DRAIN, WORKER_ADMISSION)
"""Every setting of ``pdserve decode``."""


def decode_config(args: argparse.Namespace) -> DecodeConfig:
    from decode_service.worker import DecodeConfig
    from kvtransfer.config import check_backend_device

    engine, transfer = engine_config(args), transfer_config(args)
    check_backend_device(transfer.backend, engine.model.device)  # before the model loads
    return DecodeConfig(
        engine=engine, transfer=transfer, migrate=not args.no_migration, **SERVER.fields(args)
    )
