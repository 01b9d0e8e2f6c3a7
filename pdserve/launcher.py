"""``pdserve up``: the tiers as separate processes on one machine, started and stopped together.

Each worker is the same command Kubernetes runs (``pdserve prefill`` / ``decode`` / ``gateway``),
so what runs here is what runs there. A child that dies is reported and stops the cluster
(with ``--keep-going``, only the gateway's death does: the gateway routes around dead workers).
``--state-file`` records each child's name, pid, address and command line as JSON, so tests and
operators can find (and kill, or restart) one worker.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.settings import Setting, env_vars, to_argv
from core.tls import TLSConfig, sync_channel
from decode_service import settings as decode_settings
from engine.model_files import resolve_model_path
from engine.settings import ENGINE, MODEL, model_config
from gateway import settings as gateway_settings
from kvtransfer.settings import KEY_ENV, TRANSFER
from pdserve.settings import UP
from prefill_service import settings as prefill_settings
from server_runtime.settings import DRAIN, LOG, SERVER_TLS, auth_tokens
from server_runtime.worker_settings import WORKER_ADMISSION

log = structlog.get_logger(__name__)

READY_TIMEOUT_S = 300.0
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


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    address: str  # gRPC address, for the readiness check
    argv: tuple[str, ...]
    cpus: tuple[int, ...] = ()  # pinned by the launcher after start (the gateway has no flag)


def plan_cluster(args: argparse.Namespace, log_level: str) -> list[ProcessSpec]:
    """Ports: prefill workers first, then decode workers, then decode KV endpoints.

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
        own = {"listen": addr, "metrics_port": next(metrics)}
        argv = (
            *me,
            "prefill",
            *to_argv(prefill_settings.SERVER, own),
            *to_argv(WORKER_FLAGS, args, {**shared, "cpus": next(cores)}),
            *worker_tls,
        )
        specs.append(ProcessSpec(f"prefill-{i}", addr, argv))
    ipc_dir = tempfile.gettempdir()
    for i, addr in enumerate(decode_addrs):
        if args.kv_transport == "ipc":
            kv = f"ipc://{ipc_dir}/pdserve-{os.getpid()}-decode-{i}.sock"
        else:
            kv = f"tcp://{host}:{base + args.prefill + args.decode + i}"
        own = {"listen": addr, "kv_bind": kv, "metrics_port": next(metrics)}
        argv = (
            *me,
            "decode",
            *to_argv(decode_settings.SERVER, own),
            *to_argv(WORKER_FLAGS, args, {**shared, "cpus": next(cores)}),
            *worker_tls,
        )
        specs.append(ProcessSpec(f"decode-{i}", addr, argv))
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
    specs.append(ProcessSpec("gateway", gateway_addr, gw, gateway_cpus))
    return specs


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


class Cluster:
    def __init__(
        self,
        specs: list[ProcessSpec],
        env: dict[str, str],
        *,
        tls: TLSConfig | None = None,
        stop_grace_s: float = 5.0 + STOP_MARGIN_S,
    ) -> None:
        self.specs = specs
        self.env = env
        self.tls = tls
        self.stop_grace_s = stop_grace_s
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.reported: set[str] = set()

    def start(self) -> None:
        for spec in self.specs:
            self.procs[spec.name] = subprocess.Popen(spec.argv, env=self.env)
            if spec.cpus:
                os.sched_setaffinity(self.procs[spec.name].pid, spec.cpus)
            log.info(
                "process_started",
                name=spec.name,
                pid=self.procs[spec.name].pid,
                address=spec.address,
            )

    def write_state(self, path: Path) -> None:
        """The children as JSON (written atomically): name, pid, address, command line."""
        children = [
            {
                "name": spec.name,
                "pid": self.procs[spec.name].pid,
                "address": spec.address,
                "argv": list(spec.argv),
            }
            for spec in self.specs
        ]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "children": children}, indent=1))
        tmp.replace(path)

    def dead(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self.procs.items() if p.poll() is not None]

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(self.specs)
        while pending:
            if self.dead():
                name, code = self.dead()[0]
                raise RuntimeError(f"{name} exited with code {code} during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout_s:.0f}s: {[s.name for s in pending]}")
            pending = [s for s in pending if not serving(s.address, self.tls)]
            if pending:
                time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_grace_s
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("process_killed", name=name)
                proc.kill()
                proc.wait()


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


def run_cluster(args: argparse.Namespace) -> int:
    if args.decode < 1 or args.prefill < 0:
        print("pdserve up: need --decode >= 1 and --prefill >= 0", file=sys.stderr)
        return 2
    if (args.tls_cert is None) != (args.tls_key is None) or (
        args.tls_cert is not None and args.tls_ca is None
    ):
        print(
            "pdserve up: TLS needs --tls-cert, --tls-key and --tls-ca (the CA that signed them; "
            "the tiers authenticate each other with it)",
            file=sys.stderr,
        )
        return 2
    resolve_model_path(model_config(args))  # convert the default model once, before the workers
    quiet = args.generate is not None and args.log_level == "info"
    cluster = Cluster(
        plan_cluster(args, "warning" if quiet else args.log_level),
        cluster_env(args),
        tls=_cluster_tls(args),
        stop_grace_s=float(args.shutdown_grace) + STOP_MARGIN_S,
    )
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster.start()
    if args.state_file is not None:
        cluster.write_state(Path(args.state_file))
    try:
        cluster.wait_ready()
        gateway = f"{args.host}:{args.port}"
        mode = "disaggregated" if args.prefill else "colocated"
        log.info(
            "cluster_ready", gateway=gateway, prefill=args.prefill, decode=args.decode, mode=mode
        )
        if args.generate is not None:
            return _generate_once(gateway, args)
        print(f"pdserve is up ({mode}): gateway at {gateway}. Ctrl-C to stop.", file=sys.stderr)
        while not stop:
            if _report_dead(cluster, args.keep_going):
                return 1
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        print(f"pdserve up: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()


def _report_dead(cluster: Cluster, keep_going: bool) -> bool:
    """Report children that died since the last call; True when the cluster must stop."""
    must_stop = False
    for name, code in cluster.dead():
        if name in cluster.reported:
            continue
        cluster.reported.add(name)
        log.error("process_died", name=name, exit_code=code)
        if keep_going and name != "gateway":
            print(f"pdserve up: {name} exited with code {code}; continuing", file=sys.stderr)
        else:
            print(f"pdserve up: {name} exited with code {code}; stopping", file=sys.stderr)
            must_stop = True
    return must_stop


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
