"""The settings of ``pdserve up`` and ``pdserve generate`` that no tier owns, declared once, and
the groups each command takes (the tiers' own come from their ``settings`` modules).

``pdserve bench``'s live with it, in :mod:`pdserve.bench.cli`.
"""

from __future__ import annotations

from pathlib import Path

from core.settings import Group, Setting
from engine.settings import ENGINE, MODEL
from gateway.settings import FLEET
from kvtransfer.settings import TRANSFER
from pdserve.ports import WORKER_BASE_PORT
from server_runtime.settings import (
    AUTH_TOKEN_ENV,
    CLIENT_TLS,
    DRAIN,
    LOG,
    SERVER_TLS,
)
from server_runtime.worker_settings import WORKER_ADMISSION

CLUSTER = Group(
    None,
    (
        Setting("--prefill", type=int, default=1, help="prefill workers (0: colocated)"),
        Setting("--decode", type=int, default=1, help="decode workers"),
        Setting("--host", default="127.0.0.1"),
        Setting("--port", type=int, default=50051, help="gateway port"),
        Setting(
            "--worker-base-port",
            type=int,
            default=WORKER_BASE_PORT,
            help="first port of the workers' gRPC servers (prefill workers, then decode "
            "workers; KV endpoints are picked by the kernel); the default keeps them below "
            "the kernel's ephemeral range, where an outgoing connection could be holding one",
        ),
        Setting("--kv-transport", choices=["tcp", "ipc"], default="tcp"),
        Setting(
            "--generate",
            metavar="PROMPT",
            help="stream the model's answer to PROMPT (sent as a user chat message, so an "
            "instruct model answers it), then stop the cluster",
        ),
        Setting(
            "--completion",
            switch=True,
            help="with --generate: send PROMPT as raw text to continue, not as a chat message",
        ),
        Setting("--max-tokens", type=int, default=64, help="with --generate"),
    ),
)

LAUNCHER = Group(
    None,
    (
        Setting(
            "--also-prefill",
            repeat=True,
            help="a prefill worker address the gateway also routes to (started elsewhere or later)",
        ),
        Setting(
            "--also-decode",
            repeat=True,
            help="a decode worker address the gateway also routes to (started elsewhere or later)",
        ),
        Setting(
            "--state-file",
            type=Path,
            help="write the children's names, pids, addresses and command lines here (JSON)",
        ),
        Setting(
            "--pin-cpus",
            switch=True,
            help="give each worker a CPU core of its own (round-robin over this process's "
            "cores), so a prefill never competes with decode for a core",
        ),
        Setting(
            "--metrics-base-port",
            type=int,
            default=0,
            help="serve /metrics: gateway on this port, workers on the next ones (prefill "
            "first, then decode), then the launcher's own (restarts, exits); 0: off",
        ),
    ),
)

SUPERVISION = Group(
    "supervision (a worker that dies is restarted; the gateway's death stops the cluster)",
    (
        Setting(
            "--fail-fast",
            switch=True,
            help="any child that fails (exits, or cannot start) stops the whole cluster, "
            "with exit status 1",
        ),
        Setting(
            "--keep-going",
            switch=True,
            help="never restart a worker: one that dies stays down and the rest keep serving "
            "(the gateway routes around it); the same as --restart-limit 0",
        ),
        Setting(
            "--restart-delay",
            type=float,
            default=0.5,
            help="seconds before a failed worker starts again; doubles with each restart "
            "within --restart-window, up to --restart-max-delay",
        ),
        Setting("--restart-max-delay", type=float, default=30.0, help="seconds"),
        Setting(
            "--restart-limit",
            type=int,
            default=5,
            help="restarts of one worker within --restart-window; one more failure and the "
            "launcher gives up on it (it stays down, the rest keep serving)",
        ),
        Setting("--restart-window", type=float, default=60.0, help="seconds"),
        Setting(
            "--worker-start-timeout",
            type=float,
            default=300.0,
            help="seconds a (re)started worker has to report SERVING before it is killed "
            "and counts as failed",
        ),
    ),
)

UP = (
    CLUSTER,
    MODEL,
    ENGINE,
    TRANSFER,
    LOG,
    *FLEET,
    SERVER_TLS,
    DRAIN,
    WORKER_ADMISSION,
    LAUNCHER,
    SUPERVISION,
)
"""Every setting of ``pdserve up``."""

GENERATE = Group(
    None,
    (
        Setting("--gateway", default="127.0.0.1:50051"),
        Setting("--chat", switch=True, help="send PROMPT as a user chat message"),
        Setting("--max-tokens", type=int, default=64),
        Setting("--temperature", type=float, default=0.0),
        Setting("--top-p", type=float),
        Setting("--top-k", type=int),
        Setting("--seed", type=int),
        Setting("--stop", repeat=True, split="\n", help="a stop string (repeat; env: one a line)"),
        Setting("--timeout", type=float, help="deadline in seconds"),
        Setting(
            "--retries",
            type=int,
            default=3,
            help="retries on RESOURCE_EXHAUSTED before the first token (after the server's delay)",
        ),
        Setting(
            "--auth-token-file",
            type=Path,
            help=f"file whose first line is the bearer token (or set {AUTH_TOKEN_ENV})",
        ),
    ),
)
"""``pdserve generate``'s flags (after its PROMPT), with :data:`CLIENT_TLS`."""

GENERATE_GROUPS = (GENERATE, CLIENT_TLS)
