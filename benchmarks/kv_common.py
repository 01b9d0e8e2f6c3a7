"""Shared pieces of ``benchmarks/kv_transfer.py``: KV geometry, statistics, the machine, the
child processes each measurement runs in, and the decode-side receiver process.

Every timestamp that is compared across processes is ``time.monotonic()`` (CLOCK_MONOTONIC,
system-wide on Linux); ``time.perf_counter`` is not used for that.
"""

from __future__ import annotations

import multiprocessing
import operator
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch

CTX = multiprocessing.get_context("spawn")  # no fork after torch and zmq threads exist
FLEET_KEY = b"pdserve-kv-benchmark-fleet-key-0123456789"  # >= 16 bytes, as FrameAuth requires
AUTH_MODES: dict[str, tuple[bytes | None, bool]] = {
    # name -> (key, checksum). With a key every frame carries an AES-GMAC over header + payload
    # and the checksum switch has no effect, so "key, checksum off" is the same path as "gmac".
    "gmac": (FLEET_KEY, True),
    "xxh3": (None, True),
    "none": (None, False),
}


@dataclass(frozen=True)
class Geometry:
    """KV layout of one model: the default model's unless told otherwise."""

    num_layers: int = 30
    num_kv_heads: int = 3
    head_dim: int = 64
    block_size: int = 16
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype)
        assert isinstance(dtype, torch.dtype)
        return dtype

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def page_shape(self, num_blocks: int) -> tuple[int, ...]:
        """(L, 2, n, bs, KVH, D): every layer of ``num_blocks`` blocks, as on the wire."""
        return (
            self.num_layers,
            2,
            num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        )

    def payload_bytes(self, tokens: int) -> int:
        """Bytes a prompt of ``tokens`` ships: whole blocks, every layer, K and V."""
        return self.blocks_for(tokens) * self.block_size * self.bytes_per_token

    def to_fields(self) -> dict[str, Any]:
        return asdict(self)


INTEGRITY = {"gmac": "aes-256-gmac", "xxh3": "xxh3-64", "none": "none"}


def fingerprint_fields(model: str, geometry: Geometry, backend: str, auth: str) -> dict[str, Any]:
    """The handshake fingerprint both ends of a benchmark transfer present (built here rather
    than with ``kvtransfer.config.fingerprint_for``, which needs a loaded model)."""
    from dataclasses import fields

    from core.ticket import Fingerprint

    values: dict[str, Any] = {
        "model": model,
        "dtype": geometry.dtype,
        "block_size": geometry.block_size,
        "num_layers": geometry.num_layers,
        "num_kv_heads": geometry.num_kv_heads,
        "head_dim": geometry.head_dim,
        "backend": backend,
    }
    if "integrity" in {f.name for f in fields(Fingerprint)}:
        values["integrity"] = INTEGRITY[auth]
    return Fingerprint(**values).to_fields()


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and spread of repeated measurements."""
    if not samples:
        return {"median": float("nan"), "p25": float("nan"), "p75": float("nan"), "n": 0}
    ordered = sorted(samples)
    if len(ordered) >= 2:
        p25, _, p75 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        p25 = p75 = ordered[0]
    return {
        "median": statistics.median(ordered),
        "p25": p25,
        "p75": p75,
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def machine() -> dict[str, Any]:
    """What ran the benchmark: cores, CPU model, load, library versions."""
    import zmq

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = float("nan")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gib = int(line.split()[1]) / (1 << 20)
                    break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_gib, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
    }


def child_setup() -> None:
    """First thing in every child: one torch thread (as `pdserve up` gives each worker on two
    cores), and only warnings from pdserve's loggers."""
    torch.set_num_threads(1)
    from server_runtime.log_setup import configure_logging

    configure_logging(level="warning", json=False)


def recv_within(conn: Connection, timeout_s: float, what: str) -> Any:
    if not conn.poll(timeout_s):
        raise TimeoutError(f"no {what} within {timeout_s:.0f}s")
    return conn.recv()


def run_pair(sender: Callable[..., Any], sender_args: tuple[Any, ...], timeout_s: float) -> Any:
    """Run ``sender(peer, *sender_args)`` in a fresh process against a fresh receiving process
    (:func:`receiver_server_main`, driven through ``peer``); return what the sender returns."""
    peer_r, peer_s = CTX.Pipe()
    result_parent, result_child = CTX.Pipe(duplex=False)
    procs: list[BaseProcess] = [
        CTX.Process(target=receiver_server_main, args=(peer_r,), name="kv-bench-receiver"),
        CTX.Process(
            target=_report,
            args=(result_child, sender, peer_s, *sender_args),
            name="kv-bench-sender",
        ),
    ]
    for proc in procs:
        proc.daemon = True
        proc.start()
    for end in (peer_r, peer_s, result_child):
        end.close()
    try:
        deadline = time.monotonic() + timeout_s
        while not result_parent.poll(0.2):
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with {dead[0].exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"benchmark processes did not finish within {timeout_s:.0f}s")
        status, payload = result_parent.recv()
        if status != "ok":
            raise RuntimeError(f"benchmark sender failed:\n{payload}")
        return payload
    finally:
        for proc in procs:
            proc.join(timeout=15)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        result_parent.close()


def _report(result: Connection, sender: Callable[..., Any], peer: Connection, *args: Any) -> None:
    import traceback

    try:
        child_setup()
        payload = sender(peer, *args)
    except BaseException:
        result.send(("error", traceback.format_exc()))
        sys.exit(1)
    finally:
        peer.send(("exit",))
    result.send(("ok", payload))


# -- the decode side: KVReceivers writing into a real KVCache, in their own process ----------


def receiver_server_main(conn: Connection) -> None:
    """The receiving process. It serves sessions, one at a time, on commands from ``conn``:

    ``("kv", fingerprint_fields, num_blocks, key, checksum, bind)`` opens a :class:`KVReceiver`
    session and answers its endpoint; then ``("expect", tid, request_id, block_ids, lease_s)``
    -> ``"ok"``; ``("wait", request_id, timeout_s)`` -> ``(ok, monotonic time of on_ready or
    on_failed, reason)``; ``("close",)`` -> the receiver's counters.

    ``("raw", transport, tmp, copy_into, frames_per_ack, auth)`` opens a raw pyzmq PULL session
    and answers ``(data endpoint, ack endpoint)``: after every ``frames_per_ack`` frames it
    PUSHes one ack; an empty frame ends the session (answered ``"closed"``). With ``auth`` (an
    ``AUTH_MODES`` name) each frame comes as ``[tag, payload]`` and its tag is verified.

    ``("exit",)`` ends the process."""
    child_setup()
    while True:
        command = conn.recv()
        if command[0] == "kv":
            _kv_session(conn, *command[1:])
        elif command[0] == "raw":
            _raw_session(conn, *command[1:])
        else:
            return


def _kv_session(
    conn: Connection,
    fingerprint_fields: dict[str, Any],
    num_blocks: int,
    key: bytes | None,
    checksum: bool,
    bind: str,
) -> None:
    from core.ticket import Fingerprint
    from engine.kv_cache import KVCache
    from kvtransfer.receiver import KVReceiver
    from kvtransfer.wire import FrameAuth

    fingerprint = Fingerprint(**fingerprint_fields)
    kv = KVCache(
        num_layers=fingerprint.num_layers,
        num_blocks=num_blocks,
        block_size=fingerprint.block_size,
        num_kv_heads=fingerprint.num_kv_heads,
        head_dim=fingerprint.head_dim,
        dtype=getattr(torch, fingerprint.dtype),
        device=torch.device("cpu"),
    )
    kv.kv.fill_(1.0)  # touch every page now, not during the first transfers
    outcomes: dict[str, tuple[bool, float, str]] = {}
    done = threading.Condition()

    def on_ready(request_id: str, first_token_id: int) -> None:
        now = time.monotonic()
        with done:
            outcomes[request_id] = (True, now, "")
            done.notify_all()

    def on_failed(request_id: str, reason: str) -> None:
        now = time.monotonic()
        with done:
            outcomes[request_id] = (False, now, reason)
            done.notify_all()

    receiver = KVReceiver(bind, kv, fingerprint, FrameAuth(key, checksum), on_ready, on_failed)
    conn.send(receiver.start())
    while True:
        command = conn.recv()
        if command[0] == "expect":
            _, tid, request_id, block_ids, lease_s = command
            receiver.expect(tid, request_id, block_ids, lease_s)
            conn.send("ok")
        elif command[0] == "wait":
            _, request_id, timeout_s = command
            with done:
                done.wait_for(partial(operator.contains, outcomes, request_id), timeout=timeout_s)
                conn.send(outcomes.pop(request_id, (False, float("nan"), "timeout")))
        else:
            receiver.stop()
            conn.send(stats_fields(receiver.stats))
            return


def _raw_session(
    conn: Connection,
    transport: str,
    tmp: str,
    copy_into: bool,
    frames_per_ack: int,
    auth_mode: str | None,
) -> None:
    import warnings

    import zmq

    from kvtransfer.wire import FrameAuth

    auth = FrameAuth(*AUTH_MODES[auth_mode]) if auth_mode else None

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    ack = ctx.socket(zmq.PUSH)
    pull.bind(endpoint(transport, tmp, "raw-data"))
    ack.bind(endpoint(transport, tmp, "raw-ack"))
    conn.send((pull.getsockopt_string(zmq.LAST_ENDPOINT), ack.getsockopt_string(zmq.LAST_ENDPOINT)))
    destinations: dict[int, torch.Tensor] = {}
    count = 0
    while True:
        frames = pull.recv_multipart(copy=False)
        frame = frames[-1]
        size = len(frame)
        if size == 0:
            break
        if auth is not None:  # one pass over the frame, as a receiver must make at least
            auth.verify(auth.flags, b"", frames[0].bytes, frame.buffer)
        if copy_into:
            if size not in destinations:
                destinations[size] = torch.empty((frames_per_ack, size), dtype=torch.uint8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only buffer: only read
                source = torch.frombuffer(frame.buffer, dtype=torch.uint8)
            destinations[size][count].copy_(source)
        count += 1
        if count == frames_per_ack:
            ack.send(b"k")
            count = 0
    pull.close(linger=0)
    ack.close(linger=0)
    ctx.term()
    conn.send("closed")


def endpoint(transport: str, tmp: str, name: str) -> str:
    """A fresh endpoint to bind: an ephemeral tcp port on loopback, or a socket file."""
    if transport == "tcp":
        return "tcp://127.0.0.1:*"
    return f"ipc://{tmp}/{name}-{os.getpid()}-{time.monotonic_ns()}.sock"


def stats_fields(stats: Any) -> dict[str, Any]:
    """A :class:`kvtransfer.metrics.TransferStats` as plain JSON-able fields."""
    return {
        "transfers_started": stats.transfers_started,
        "transfers_completed": stats.transfers_completed,
        "pages": stats.pages,
        "bytes": stats.bytes,
        "failures": dict(stats.failures),
        "dropped_frames": dict(stats.dropped_frames),
    }
