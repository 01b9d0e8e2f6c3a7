"""Start a real pdserve cluster (``pdserve up``) as a child process on loopback.

Used by end-to-end tests and benchmarks: it picks free ports, waits until every tier is SERVING,
and can check that every worker is idle (all KV blocks free, nothing pending)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

READY_TIMEOUT_S = 240.0


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
        base = rng.randrange(20000, 60000)
        if all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no free port range")


@dataclass
class Cluster:
    gateway: str
    prefill: list[str]
    decode: list[str]
    proc: subprocess.Popen[bytes]
    log_path: Path

    def worker_status(self) -> list[worker_pb2.WorkerStatus]:
        out = []
        for addr in self.prefill:
            with grpc.insecure_channel(addr) as ch:
                out.append(worker_pb2_grpc.PrefillStub(ch).GetStatus(worker_pb2.StatusRequest()))
        for addr in self.decode:
            with grpc.insecure_channel(addr) as ch:
                out.append(worker_pb2_grpc.DecodeStub(ch).GetStatus(worker_pb2.StatusRequest()))
        return out

    def wait_idle(self, timeout_s: float = 15.0) -> list[worker_pb2.WorkerStatus]:
        """Every pool back to all-free, nothing running or pending; returns the last status."""
        deadline = time.monotonic() + timeout_s
        while True:
            statuses = self.worker_status()
            if all(_idle(s) for s in statuses) or time.monotonic() > deadline:
                return statuses
            time.sleep(0.1)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _idle(s: worker_pb2.WorkerStatus) -> bool:
    return (
        s.free_blocks == s.total_blocks
        and s.running == 0
        and s.waiting == 0
        and s.pending_transfers == 0
        and s.pool_ok
    )


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1.0
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def start_cluster(
    model: str,
    *,
    prefill: int,
    decode: int,
    log_dir: Path,
    cache_dir: Path | None = None,
    extra: tuple[str, ...] = (),
) -> Cluster:
    gateway_port = free_port_range(1)
    base = free_port_range(prefill + 2 * decode)
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
        *extra,
    ]
    if cache_dir is not None:
        argv += ["--cache-dir", str(cache_dir)]
    log_path = log_dir / f"cluster-{gateway_port}.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    cluster = Cluster(
        gateway=f"127.0.0.1:{gateway_port}",
        prefill=[f"127.0.0.1:{base + i}" for i in range(prefill)],
        decode=[f"127.0.0.1:{base + prefill + i}" for i in range(decode)],
        proc=proc,
        log_path=log_path,
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    addresses = [cluster.gateway, *cluster.prefill, *cluster.decode]
    while not all(_serving(a) for a in addresses):
        if proc.poll() is not None:
            raise RuntimeError(f"cluster exited with {proc.returncode}:\n{cluster.logs()}")
        if time.monotonic() > deadline:
            cluster.stop()
            raise RuntimeError(f"cluster not ready in {READY_TIMEOUT_S}s:\n{cluster.logs()}")
        time.sleep(0.3)
    return cluster
