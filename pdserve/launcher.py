"""``pdserve up``: the tiers as separate processes on one machine, started, supervised and
stopped together.

Each worker is the same command Kubernetes runs (``pdserve prefill`` / ``decode`` /
``gateway``), so what runs here is what runs there. This module plans the children (ports,
command lines, TLS per role) and runs them under :class:`pdserve.supervisor.Supervisor`: a
worker that dies is restarted on the same addresses with backoff and given up on after a
crash loop, while the gateway routes around it; the gateway's death stops the cluster
(exit status 1). ``--fail-fast`` stops the cluster on any child's failure, ``--keep-going``
never restarts. ``--state-file`` records each child's name, pid, address, command line,
state and restarts as JSON, rewritten on every change, so tests and operators can find (and
kill) one worker.
"""

from __future__ import annotations

import argparse
import itertools
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Iterator

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.settings import Setting, env_vars, to_argv
from core.tls import TLSConfig, sync_channel
from decode_service import settings as decode_settings
from engine.model_files import resolve_model_path
from engine.settings import ENGINE, MODEL, model_config
from gateway import settings as gateway_settings
from kvtransfer.settings import KEY_ENV, TRANSFER, check_flags
from pdserve.ports import ephemeral_range, overlap
from pdserve.settings import UP
from pdserve.supervisor import Bind, ClusterFailed, ProcessSpec, RestartPolicy, Supervisor
from pdserve.supervisor_metrics import SupervisorMetrics
from prefill_service import settings as prefill_settings
from server_runtime.settings import DRAIN, LOG, SERVER_TLS, auth_tokens
from server_runtime.worker_settings import WORKER_ADMISSION

log = structlog.get_logger(__name__)

TICK_S = 0.2  # how often the supervisor looks at its children
STOP_MARGIN_S = 5.0  # beyond the children's own --shutdown-grace before they are killed

WORKER_FLAGS: tuple[Setting, ...] = (*MODEL, *LOG, *ENGINE, *TRANSFER, *DRAIN, *WORKER_ADMISSION)
"""What ``up`` passes on to every worker as it was given (``--threads``, ``--cpus`` and the log
level as the launcher divides and quiets them)."""
GATEWAY_FLAGS: tuple[Setting, ...] = (
    *MODEL,
    *LOG,
    *gateway_settings.HTTP,
    *gateway_settings.ROUTING,
    *gateway_settings.ADMISSION,
    gateway_settings.AUTH_TOKEN_FILE,
    *DRAIN,
)
"""What ``up`` passes on to the gateway as it was given (TLS towards workers is per role)."""
TLS_FLAGS: tuple[Setting, ...] = (*SERVER_TLS, *gateway_settings.UPSTREAM_TLS)
UP_VARIABLES = env_vars(*UP)


__all__ = ["GATEWAY_FLAGS", "WORKER_FLAGS", "ProcessSpec", "plan_cluster", "run_cluster", "serving"]


def plan_cluster(args: argparse.Namespace, log_level: str) -> list[ProcessSpec]:
    """Ports: prefill workers first, then decode workers, from ``--worker-base-port``: fixed,
    because the gateway's worker list is static and a restarted worker must come back on its
    address. A decode worker's KV endpoint (tcp) is left to the kernel: every transfer
    ticket carries it, so nothing needs to know it beforehand, it cannot collide, and a
    restarted worker gets a fresh one (a prefill worker then handshakes with it anew rather
    than reusing the handshake it made with the dead process).

    Each child's command line is written from the settings' declarations: what ``up`` was
    given (``WORKER_FLAGS``, ``GATEWAY_FLAGS``), this layout's addresses, and TLS per role."""
    host, base = args.host, args.worker_base_port
    threads = args.threads or _threads_per_worker(args.prefill + args.decode)
    shared = {"log_level": log_level, "threads": threads}
    worker_tls = to_argv(TLS_FLAGS, cluster_tls(args, "worker"))
    me = (sys.executable, "-m", "pdserve.cli")
    specs: list[ProcessSpec] = []
    prefill_addrs = [f"{host}:{base + i}" for i in range(args.prefill)]
    decode_addrs = [f"{host}:{base + args.prefill + i}" for i in range(args.decode)]
    metrics = _metrics_ports(args)
    cores = _pinned_cores(args)
    for i, addr in enumerate(prefill_addrs):
        metrics_port = next(metrics)
        own = {"listen": addr, "metrics_port": metrics_port}
        binds = _binds(host, base + i, metrics_port)
        argv = (
            *me,
            "prefill",
            *to_argv(prefill_settings.SERVER, own),
            *to_argv(WORKER_FLAGS, args, {**shared, "cpus": next(cores)}),
            *worker_tls,
        )
        specs.append(ProcessSpec(f"prefill-{i}", addr, argv, binds=binds))
    ipc_dir = tempfile.gettempdir()
    for i, addr in enumerate(decode_addrs):
        if args.kv_transport == "ipc":
            kv = f"ipc://{ipc_dir}/pdserve-{os.getpid()}-decode-{i}.sock"
        else:  # the kernel picks it; each ticket carries it (see plan_cluster's docstring)
            kv = f"tcp://{host}:0"
        metrics_port = next(metrics)
        own = {"listen": addr, "kv_bind": kv, "metrics_port": metrics_port}
        binds = _binds(host, base + args.prefill + i, metrics_port)
        argv = (
            *me,
            "decode",
            *to_argv(decode_settings.SERVER, own),
            *to_argv(WORKER_FLAGS, args, {**shared, "cpus": next(cores)}),
            *worker_tls,
        )
        specs.append(ProcessSpec(f"decode-{i}", addr, argv, binds=binds))
    gateway_addr = f"{host}:{args.port}"
    own = {
        "listen": gateway_addr,
        "prefill": [*prefill_addrs, *args.also_prefill],
        "decode": [*decode_addrs, *args.also_decode],
        "metrics_port": args.metrics_base_port,
    }
    gw = (
        *me,
        "gateway",
        *to_argv(gateway_settings.SERVER, own),
        *to_argv(GATEWAY_FLAGS, args, {"log_level": log_level}),
        *to_argv(TLS_FLAGS, cluster_tls(args, "gateway")),
    )
    # with --pin-cpus the gateway shares the first core (the first prefill worker's), so the
    # decode workers' cores carry nothing but decode
    gateway_cpus = (sorted(os.sched_getaffinity(0))[0],) if args.pin_cpus else ()
    binds = _binds(host, args.port, args.metrics_base_port)
    if args.http_port:
        binds += (Bind(host, args.http_port),)
    specs.append(ProcessSpec("gateway", gateway_addr, gw, gateway_cpus, binds))
    return specs


def _binds(host: str, port: int, metrics_port: int) -> tuple[Bind, ...]:
    """A child's gRPC address, and its metrics port (on every interface) when on."""
    return (Bind(host, port), *((Bind("0.0.0.0", metrics_port),) if metrics_port else ()))


def launcher_metrics_port(args: argparse.Namespace) -> int:
    """The launcher's own /metrics: after the workers' (0: off, as theirs are)."""
    base = args.metrics_base_port
    return base + 1 + args.prefill + args.decode if base else 0


def restart_policy(args: argparse.Namespace) -> RestartPolicy:
    """From the supervision settings; ``--keep-going`` is a limit of 0 (never restart)."""
    return RestartPolicy(
        delay_s=args.restart_delay,
        max_delay_s=args.restart_max_delay,
        limit=0 if args.keep_going else args.restart_limit,
        window_s=args.restart_window,
    )


def cluster_tls(args: argparse.Namespace, role: str) -> dict[str, object]:
    """TLS settings of one ``pdserve up`` child: every hop uses ``--tls-cert``/``--tls-key``;
    workers require the gateway's client certificate (mTLS between tiers); the public side
    requires one only with ``--tls-require-client-cert``."""
    if args.tls_cert is None:
        return {}
    tls = {"tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_ca": args.tls_ca}
    if role != "gateway":
        return {**tls, "tls_require_client_cert": args.tls_ca is not None}
    tls["tls_require_client_cert"] = args.tls_require_client_cert
    if args.tls_ca is None:
        return tls
    upstream = {"ca": args.tls_ca, "cert": args.tls_cert, "key": args.tls_key}
    return {**tls, **{f"upstream_tls_{k}": v for k, v in upstream.items()}}


def _pinned_cores(args: argparse.Namespace) -> Iterator[str | None]:
    """``--cpus`` for each worker in turn: a core of its own (wrapping around) with
    ``--pin-cpus``, else the shared ``--cpus`` or nothing."""
    if args.pin_cpus:
        cores = sorted(os.sched_getaffinity(0))
        return (str(cores[i % len(cores)]) for i in itertools.count())
    return itertools.repeat(args.cpus or None)


def _metrics_ports(args: argparse.Namespace) -> Iterator[int]:
    """Workers' metrics ports after the gateway's; all 0 (off) unless a base port is given."""
    base = args.metrics_base_port
    return itertools.count(base + 1) if base else itertools.repeat(0)


def cluster_env(args: argparse.Namespace) -> dict[str, str]:
    """The children's environment: without the ``PDSERVE_*`` twins of ``up``'s own flags (their
    values reach the children as flags, per role), and with no key given, a fresh random one
    for this cluster."""
    env = {k: v for k, v in os.environ.items() if k not in UP_VARIABLES}
    if not args.kv_insecure and not args.kv_key_file and not env.get(KEY_ENV):
        env[KEY_ENV] = secrets.token_hex(32)
    return env


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def serving(address: str, tls: TLSConfig | None = None, service: str = "") -> bool:
    """Whether the server at ``address`` reports SERVING (over TLS, with a client
    certificate for mTLS, when ``tls`` is given)."""
    with sync_channel(address, tls) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _cluster_tls(args: argparse.Namespace) -> TLSConfig | None:
    """How the launcher itself reaches the children (their CA; its cert for mTLS)."""
    if args.tls_cert is None:
        return None
    return TLSConfig(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca)


def _refused(args: argparse.Namespace) -> str | None:
    """Why ``up`` refuses these settings (None: it does not)."""
    if args.decode < 1 or args.prefill < 0:
        return "need --decode >= 1 and --prefill >= 0"
    if (args.tls_cert is None) != (args.tls_key is None) or (
        args.tls_cert is not None and args.tls_ca is None
    ):
        return (
            "TLS needs --tls-cert, --tls-key and --tls-ca (the CA that signed them; "
            "the tiers authenticate each other with it)"
        )
    if args.fail_fast and args.keep_going:
        return "--fail-fast stops on a worker's death, --keep-going serves on: pick one"
    if args.restart_limit < 0 or min(args.restart_delay, args.restart_window) <= 0:
        return "need --restart-limit >= 0, --restart-delay > 0 and --restart-window > 0"
    try:  # what every worker would refuse: better said once than crash-looped
        keyed = not args.kv_insecure  # up makes a key unless insecure
        check_flags(args, keyed=keyed, device=args.device)
    except ValueError as exc:
        return str(exc)
    return None


def _warn_if_ephemeral(args: argparse.Namespace) -> None:
    """Worker ports inside the kernel's ephemeral range can be held by any outgoing
    connection; say so (they still work while they are free)."""
    ports = range(args.worker_base_port, args.worker_base_port + args.prefill + args.decode)
    inside = overlap(ports, ephemeral_range())
    if inside is not None:
        log.warning(
            "worker_ports_in_ephemeral_range",
            first=inside.start,
            last=inside.stop - 1,
            hint="an outgoing connection may hold one; pick --worker-base-port below the "
            "range in /proc/sys/net/ipv4/ip_local_port_range",
        )


def _supervisor(args: argparse.Namespace, log_level: str, metrics: SupervisorMetrics) -> Supervisor:
    tls = _cluster_tls(args)
    return Supervisor(
        plan_cluster(args, log_level),
        cluster_env(args),
        probe=lambda spec: serving(spec.address, tls),
        policy=restart_policy(args),
        fail_fast=args.fail_fast,
        start_timeout_s=args.worker_start_timeout,
        stop_grace_s=float(args.shutdown_grace) + STOP_MARGIN_S,
        metrics=metrics,
        state_file=args.state_file,
        decode_elsewhere=bool(args.also_decode),
    )


def run_cluster(args: argparse.Namespace) -> int:
    refused = _refused(args)
    if refused is not None:
        print(f"pdserve up: {refused}", file=sys.stderr)
        return 2
    resolve_model_path(model_config(args))  # convert the default model once, before the workers
    quiet = args.generate is not None and args.log_level == "info"
    _warn_if_ephemeral(args)
    metrics = SupervisorMetrics()
    supervisor = _supervisor(args, "warning" if quiet else args.log_level, metrics)
    try:
        metrics.serve(launcher_metrics_port(args))
    except OSError as exc:
        print(f"pdserve up: metrics port {launcher_metrics_port(args)}: {exc}", file=sys.stderr)
        return 1
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def stopping() -> bool:
        """Sleep a tick, then look at the children unless a signal came meanwhile (the
        children got it too, and their exits are no failures)."""
        time.sleep(TICK_S)
        if not stop:
            supervisor.tick()
        return stop

    try:
        supervisor.start()
        while not supervisor.ready:
            if stopping():
                return 0
        gateway = f"{args.host}:{args.port}"
        mode = "disaggregated" if args.prefill else "colocated"
        log.info(
            "cluster_ready",
            gateway=gateway,
            prefill=args.prefill,
            decode=args.decode,
            mode=mode,
            gave_up=supervisor.gave_up(),
            launcher_metrics_port=launcher_metrics_port(args),
        )
        if args.generate is not None:
            return _generate_once(gateway, args)
        print(f"pdserve is up ({mode}): gateway at {gateway}. Ctrl-C to stop.", file=sys.stderr)
        while not stopping():
            pass
        return 0
    except ClusterFailed as exc:
        log.error("cluster_failed", error=str(exc))
        print(f"pdserve up: {exc}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop()


def _generate_once(gateway: str, args: argparse.Namespace) -> int:
    from pdserve.client import RequestOptions
    from pdserve.generate_cmd import stream_completion

    tls = _cluster_tls(args)
    tokens = auth_tokens(args.auth_token_file)
    options = RequestOptions(max_tokens=args.max_tokens, temperature=0)
    if not args.completion:
        options["messages"] = [("user", args.generate)]
    return stream_completion(
        gateway,
        args.generate if args.completion else None,
        options,
        tls=tls,
        token=tokens[0] if tokens else None,
    )
