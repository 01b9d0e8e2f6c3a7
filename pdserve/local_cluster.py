"""Start a real pdserve cluster (``pdserve up``) as a child process on loopback.

Used by end-to-end tests and benchmarks: it picks free ports, waits until every tier is SERVING,
and can check that every worker is idle (all KV blocks free, nothing pending). ``up`` writes a
state file of its children (rewritten whenever the launcher starts, restarts or gives up on
one), so a test can find a worker's pid (to kill it), its state and restarts, and its command
line (to start a copy of it on new ports). Ports are picked below the kernel's ephemeral range
(32768 and up), where no outgoing connection can be holding one."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from core.tls import TLSConfig, sync_channel
from pdserve.launcher import serving
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

READY_TIMEOUT_S = 240.0
PORT_RANGE = range(10000, 32768)  # below Linux's default ephemeral range


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_range(count: int) -> int:
    """First port of ``count`` consecutive free ports."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        base = rng.randrange(PORT_RANGE.start, PORT_RANGE.stop - count)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range")


@dataclass(frozen=True)
class Child:
    """One process ``pdserve up`` started (from its state file)."""

    name: str
    pid: int
    """0 while the launcher has no process for it (waiting to restart it, or given up)."""
    address: str
    argv: tuple[str, ...]
    state: str = "serving"
    """The launcher's view: ``starting``, ``serving``, ``backoff`` or ``gave_up``."""
    restarts: int = 0


@dataclass
class Cluster:
    gateway: str
    prefill: list[str]
    decode: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path
    state_path: Path | None = None
    tls: TLSConfig | None = None
    """How to reach the cluster's servers (CA, and a client certificate for the workers)."""
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    """Processes a test started beside the cluster (stopped with it)."""
    http: str | None = None
    """Base URL of the gateway's OpenAI-compatible HTTP API (``http://127.0.0.1:port``, or
    ``https://`` on a cluster started with ``tls``), if on."""

    def children(self) -> dict[str, Child]:
        if self.state_path is None:
            raise RuntimeError("start the cluster with a state file to see its children")
        data = json.loads(self.state_path.read_text())
        return {
            c["name"]: Child(
                c["name"],
                int(c["pid"]),
                c["address"],
                tuple(c["argv"]),
                c.get("state", "serving"),
                int(c.get("restarts", 0)),
            )
            for c in data["children"]
        }

    def wait_child(
        self, name: str, until: Callable[[Child], bool], timeout_s: float = 60.0
    ) -> Child:
        """Child ``name`` once ``until`` holds for it (as the state file says)."""
        deadline = time.monotonic() + timeout_s
        while True:
            child = self.children()[name]
            if until(child):
                return child
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} still {child} after {timeout_s:.0f}s")
            time.sleep(0.1)

    def events(self, event: str) -> list[dict[str, object]]:
        """The JSON log lines of ``event`` so far (the launcher's and its children's)."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if f'"{event}"' not in line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == event:
                found.append(record)
        return found

    def wait_event(
        self, event: str, timeout_s: float = 60.0, **fields: object
    ) -> dict[str, object]:
        """The first log line of ``event`` whose fields include ``fields``, waiting for it."""
        deadline = time.monotonic() + timeout_s
        while True:
            for record in self.events(event):
                if all(record.get(k) == v for k, v in fields.items()):
                    return record
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {event} {fields} in {timeout_s:.0f}s:\n{self.logs()}")
            time.sleep(0.1)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to child ``name`` (SIGKILL by default); returns its pid."""
        pid = self.children()[name].pid
        os.kill(pid, sig)
        return pid

    def spawn(self, argv: list[str] | tuple[str, ...], log_name: str) -> subprocess.Popen[bytes]:
        """Start a process beside the cluster (a worker, say), logging next to the cluster's."""
        log_file = (self.log_path.parent / f"{self.log_path.stem}-{log_name}.log").open("ab")
        proc = subprocess.Popen(list(argv), stdout=log_file, stderr=subprocess.STDOUT)
        self.started.append(proc)
        return proc

    def status_of(self, address: str) -> worker_pb2.WorkerStatus:
        with sync_channel(address, self.tls) as ch:
            if address in self.prefill:
                return worker_pb2_grpc.PrefillStub(ch).GetStatus(worker_pb2.StatusRequest())
            return worker_pb2_grpc.DecodeStub(ch).GetStatus(worker_pb2.StatusRequest())

    def worker_status(self) -> list[worker_pb2.WorkerStatus]:
        return [self.status_of(addr) for addr in [*self.prefill, *self.decode]]

    def wait_idle(self, timeout_s: float = 15.0) -> list[worker_pb2.WorkerStatus]:
        """Every pool back to all-free, nothing running or pending; returns the last status."""
        deadline = time.monotonic() + timeout_s
        while True:
            statuses = self.worker_status()
            if all(_idle(s) for s in statuses) or time.monotonic() > deadline:
                return statuses
            time.sleep(0.1)

    def wait_serving(self, address: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not serving(address, self.tls):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{address} not serving after {timeout_s:.0f}s")
            time.sleep(0.2)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for proc in self.started:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _http_healthy(base: str | None, tls: TLSConfig | None = None) -> bool:
    """``GET /health`` answers 200 (True when the HTTP API is off)."""
    if base is None:
        return True
    try:
        context = None if tls is None else tls.client_ssl_context()
        with urllib.request.urlopen(f"{base}/health", timeout=2, context=context) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _idle(s: worker_pb2.WorkerStatus) -> bool:
    return (
        s.free_blocks == s.total_blocks
        and s.running == 0
        and s.waiting == 0
        and s.pending_transfers == 0
        and s.pool_ok
    )


def start_cluster(
    model: str,
    *,
    prefill: int,
    decode: int,
    log_dir: Path,
    cache_dir: Path | None = None,
    extra: tuple[str, ...] = (),
    tls: TLSConfig | None = None,
    env: dict[str, str] | None = None,
    http_port: int = 0,
    worker_base_port: int | None = None,
    skip_wait: Collection[str] = (),
) -> Cluster:
    """``pdserve up`` on free loopback ports. Pass ``tls`` (how to reach the servers) when
    ``extra`` turns TLS on; ``env`` replaces the environment of ``up`` and its children.
    The HTTP API is off unless ``http_port`` is given (say ``free_port_range(1)``): many
    clusters run at once, and ``up``'s default port would collide. ``worker_base_port``
    fixes the workers' ports (picked free otherwise); addresses in ``skip_wait`` are not
    waited for (a worker the test expects never to serve)."""
    gateway_port = free_port_range(1)
    base = worker_base_port or free_port_range(prefill + 2 * decode)
    state_path = log_dir / f"cluster-{gateway_port}.json"
    argv = [
        sys.executable,
        "-m",
        "pdserve.cli",
        "up",
        "--prefill",
        str(prefill),
        "--decode",
        str(decode),
        "--port",
        str(gateway_port),
        "--worker-base-port",
        str(base),
        "--model",
        model,
        "--log-format",
        "json",
        "--threads",
        "1",
        "--state-file",
        str(state_path),
        "--http-port",
        str(http_port),
        *extra,
    ]
    if cache_dir is not None:
        argv += ["--cache-dir", str(cache_dir)]
    log_path = log_dir / f"cluster-{gateway_port}.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    cluster = Cluster(
        gateway=f"127.0.0.1:{gateway_port}",
        prefill=[f"127.0.0.1:{base + i}" for i in range(prefill)],
        decode=[f"127.0.0.1:{base + prefill + i}" for i in range(decode)],
        proc=proc,
        log_path=log_path,
        state_path=state_path,
        tls=tls,
        http=f"{'https' if tls else 'http'}://127.0.0.1:{http_port}" if http_port else None,
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    everyone = [cluster.gateway, *cluster.prefill, *cluster.decode]
    addresses = [a for a in everyone if a not in skip_wait]
    while not all(serving(a, tls) for a in addresses) or not _http_healthy(cluster.http, tls):
        if proc.poll() is not None:
            raise RuntimeError(f"cluster exited with {proc.returncode}:\n{cluster.logs()}")
        if time.monotonic() > deadline:
            cluster.stop()
            raise RuntimeError(f"cluster not ready in {READY_TIMEOUT_S}s:\n{cluster.logs()}")
        time.sleep(0.3)
    return cluster
