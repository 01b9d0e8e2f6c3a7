"""What both worker tiers' servers take beyond :mod:`server_runtime.settings` (admission), and
their :class:`~server_runtime.worker_runtime.ServeOptions`. Torch-free to import (``pdserve``'s
parser declares these); building the options imports the worker runtime, hence torch.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from core.settings import Group, Setting
from server_runtime.settings import keepalive, server_tls

if TYPE_CHECKING:
    from server_runtime.worker_runtime import ServeOptions

WORKER_ADMISSION = Group(
    None,
    (
        Setting(
            "--max-queue",
            type=int,
            default=256,
            help="requests that may wait beyond --max-num-seqs; past that RESOURCE_EXHAUSTED "
            "(0: no bound)",
        ),
    ),
)


def worker_serve_options(args: argparse.Namespace) -> ServeOptions:
    """A worker server's TLS and admission (imports torch: call it in a worker process)."""
    from server_runtime.worker_runtime import ServeOptions

    return ServeOptions(
        tls=server_tls(args), max_queue=int(args.max_queue), keepalive=keepalive(args)
    )
