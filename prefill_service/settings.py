"""The prefill worker's settings (flags and ``PDSERVE_*`` variables), declared once, and the
:class:`~prefill_service.worker.PrefillConfig` built from them. Torch-free to import (``pdserve``'s
parser declares them); building the configuration imports the worker.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from core.settings import Group, Setting
from engine.settings import ENGINE, MODEL, engine_config
from kvtransfer.settings import TRANSFER, transfer_config
from server_runtime.settings import DRAIN, LOG, METRICS_PORT, SERVER_TLS
from server_runtime.worker_settings import WORKER_ADMISSION

if TYPE_CHECKING:
    from prefill_service.worker import PrefillConfig

SERVER = Group(
    None,
    (
        Setting("--listen", field="listen", default="127.0.0.1:50061"),
        METRICS_PORT.with_default(9101),
    ),
)

GROUPS = (SERVER, TRANSFER, MODEL, ENGINE, LOG, SERVER_TLS, DRAIN, WORKER_ADMISSION)
"""Every setting of ``pdserve prefill``."""


def prefill_config(args: argparse.Namespace) -> PrefillConfig:
    from kvtransfer.config import check_backend_device
    from prefill_service.worker import PrefillConfig

    engine, transfer = engine_config(args), transfer_config(args)
    check_backend_device(transfer.backend, engine.model.device)  # before the model loads
    return PrefillConfig(engine=engine, transfer=transfer, **SERVER.fields(args))
