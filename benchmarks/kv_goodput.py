"""Section 1 of ``benchmarks/kv_transfer.py``: goodput of each KV transfer backend.

One cell = one backend, one frame-auth mode, one prompt size. A sender process pushes the
prompt's KV (random bytes of the model's geometry) one layer per ``send_pages`` call, as the
layer-wise prefill worker does, to a receiver process whose :class:`KVReceiver` writes it into a
real :class:`KVCache`; a transfer is timed from ``open`` to the sender's ``on_sent`` (the decode
side's acknowledgement). Goodput = payload bytes / that time. "ready" goodput stops the clock at
the receiver's ``on_ready`` instead (the sequence could start decoding there).

Baselines, same bytes, same frames of one layer each:
- raw pyzmq PUSH -> PULL between two processes, ``send(copy=False)`` / ``recv(copy=False)``,
  then one small ack back (tcp and ipc); "raw+copy" also copies each frame into a tensor;
  "raw+gmac" / "raw+xxh3" tag each frame on the sender and verify it whole on the receiver once
  it has arrived (one pass each, no protocol, no copy into a pool): what the same integrity
  costs raw pyzmq here. Not a strict bound: a receiver that hashes pieces as they land (the
  stream backend) does better;
- memcpy: ``torch.Tensor.copy_`` of the whole payload in one process, one thread.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import torch
from kv_common import (
    AUTH_MODES,
    Geometry,
    endpoint,
    fingerprint_fields,
    recv_within,
    run_pair,
    stats_fields,
    summarize,
)

_T = TypeVar("_T")

BACKENDS: dict[str, tuple[str, str]] = {  # name -> (kvtransfer backend, transport)
    "zmq-tcp": ("zmq", "tcp"),
    "zmq-ipc": ("zmq", "ipc"),
    # headers over ZeroMQ, pages over a direct stream socket read straight into the pool
    "stream-tcp": ("stream", "tcp"),
    "stream-ipc": ("stream", "ipc"),  # a unix socket beside the ipc endpoint
    "gloo": ("gloo", "tcp"),  # pages over a gloo pair group, headers over ZeroMQ tcp
}
RAW_FOR_BACKEND = {
    "zmq-tcp": "raw-tcp",
    "zmq-ipc": "raw-ipc",
    "stream-tcp": "raw-tcp",
    "stream-ipc": "raw-ipc",
    "gloo": "raw-tcp",
}
TAGGED_BASELINES = ("gmac", "xxh3")  # raw pyzmq + the channel's tag on both ends
WARMUP_TRANSFERS = 2
MAX_REPS = 5000


@dataclass(frozen=True)
class Timing:
    """How long each cell runs: at least ``min_reps`` transfers and ``cell_s`` seconds."""

    cell_s: float
    min_reps: int
    baseline_passes: int  # raw baselines run this many times (before and after the cells)


def _repeat(timing: Timing, once: Callable[[], _T]) -> list[_T]:
    samples: list[_T] = []
    start = time.monotonic()
    while len(samples) < MAX_REPS and (
        len(samples) < timing.min_reps or time.monotonic() - start < timing.cell_s
    ):
        samples.append(once())
    return samples


# -- pdserve's KVSender -> KVReceiver ---------------------------------------------------------


def _kv_cell(
    peer: Connection,
    backend: str,
    auth: str,
    geometry: Geometry,
    sizes: list[int],
    timing: Timing,
    tmp: str,
) -> dict[str, Any]:
    from core.ticket import Fingerprint
    from kvtransfer.sender import KVSender, TransferSpec
    from kvtransfer.wire import FrameAuth

    kind, transport = BACKENDS[backend]
    key, checksum = AUTH_MODES[auth]
    fingerprint = fingerprint_fields("kv-transfer-benchmark", geometry, kind, auth)
    num_blocks = geometry.blocks_for(max(sizes))
    bind = endpoint(transport, tmp, f"kv-{backend}-{auth}")
    peer.send(("kv", fingerprint, num_blocks, key, checksum, bind))
    target = recv_within(peer, 60, "receiver endpoint")
    acked: dict[str, tuple[bool, float, str]] = {}
    done = threading.Condition()

    def on_sent(request_id: str, ok: bool, message: str) -> None:
        now = time.monotonic()
        with done:
            acked[request_id] = (ok, now, message)
            done.notify_all()

    sender = KVSender(Fingerprint(**fingerprint), FrameAuth(key, checksum), on_sent=on_sent)
    sender.start()
    results: dict[str, Any] = {}
    try:
        for tokens in sizes:
            num_blocks = geometry.blocks_for(tokens)
            pages = torch.randn(geometry.page_shape(num_blocks), dtype=geometry.torch_dtype)
            layers = [pages[layer : layer + 1] for layer in range(geometry.num_layers)]
            blocks = tuple(range(num_blocks))
            nbytes = geometry.payload_bytes(tokens)

            def once(
                layers: list[torch.Tensor] = layers,
                blocks: tuple[int, ...] = blocks,
                nbytes: int = nbytes,
            ) -> tuple[float, float]:
                tid = os.urandom(16)
                rid = tid.hex()
                peer.send(("expect", tid, rid, list(blocks), 120.0))
                recv_within(peer, 30, "expect answer")
                start = time.monotonic()
                sender.open(TransferSpec(rid, tid, target, blocks))
                for index, layer in enumerate(layers):  # one frame per layer, as layer-wise
                    sender.send_pages(tid, index, layer)
                sender.finish(tid, 0)
                with done:
                    if not done.wait_for(lambda: rid in acked, timeout=120):
                        raise TimeoutError("no acknowledgement in 120 s")
                    ok, acked_at, message = acked.pop(rid)
                if not ok:
                    raise RuntimeError(f"{backend}/{auth}: transfer failed: {message}")
                peer.send(("wait", rid, 30.0))
                ready_ok, ready_at, reason = recv_within(peer, 60, "ready time")
                if not ready_ok:
                    raise RuntimeError(f"{backend}/{auth}: receiver failed it: {reason}")
                return nbytes / (acked_at - start) / 1e9, nbytes / (ready_at - start) / 1e9

            for _ in range(WARMUP_TRANSFERS):  # the first one includes the handshake
                once()
            samples = _repeat(timing, once)
            results[str(tokens)] = {
                "bytes": nbytes,
                "acked_gbps": summarize([s[0] for s in samples]),
                "ready_gbps": summarize([s[1] for s in samples]),
            }
    finally:
        sender.stop()
        peer.send(("close",))
    receiver_stats = recv_within(peer, 30, "receiver stats")
    return {
        "sizes": results,
        "sender_stats": stats_fields(sender.stats),
        "receiver_stats": receiver_stats,
    }


# -- raw pyzmq baseline -----------------------------------------------------------------------


def _raw_cell(
    peer: Connection,
    transport: str,
    copy_into: bool,
    geometry: Geometry,
    sizes: list[int],
    timing: Timing,
    tmp: str,
    auth_mode: str | None = None,
) -> dict[str, Any]:
    """PUSH each layer as one zero-copy frame; the receiver PULLs them (zero-copy) and acks.
    With ``auth_mode``, the sender tags each frame as the KV channel would (one pass) and the
    receiver verifies it (one pass): the cost of per-frame integrity without any protocol."""
    import zmq

    from kvtransfer.wire import FrameAuth

    auth = FrameAuth(*AUTH_MODES[auth_mode]) if auth_mode else None
    peer.send(("raw", transport, tmp, copy_into, geometry.num_layers, auth_mode))
    data_ep, ack_ep = recv_within(peer, 60, "raw receiver endpoints")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    ack = ctx.socket(zmq.PULL)
    push.connect(data_ep)
    ack.connect(ack_ep)
    results: dict[str, Any] = {}
    try:
        for tokens in sizes:
            num_blocks = geometry.blocks_for(tokens)
            pages = torch.randn(geometry.page_shape(num_blocks), dtype=geometry.torch_dtype)
            frames = [
                memoryview(pages[layer].view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
                for layer in range(geometry.num_layers)
            ]
            nbytes = geometry.payload_bytes(tokens)

            def once(frames: list[memoryview] = frames, nbytes: int = nbytes) -> float:
                start = time.monotonic()
                for frame in frames:
                    if auth is not None:
                        push.send(auth.tag(b"", frame), zmq.SNDMORE)
                    push.send(frame, copy=False)
                ack.recv()
                return nbytes / (time.monotonic() - start) / 1e9

            for _ in range(WARMUP_TRANSFERS):
                once()
            results[str(tokens)] = {"bytes": nbytes, "gbps": summarize(_repeat(timing, once))}
    finally:
        push.send(b"")
        push.close(linger=2000)
        ack.close(linger=0)
        ctx.term()
    recv_within(peer, 30, "raw session end")
    return results


def _plan_main(
    peer: Connection,
    geometry_fields: dict[str, Any],
    sizes: list[int],
    timing: Timing,
    backends: list[str],
    auths: list[str],
    tmp: str,
) -> dict[str, Any]:
    """The sending process: raw baselines, every backend cell, raw baselines again."""
    geometry = Geometry(**geometry_fields)
    raw: dict[str, list[dict[str, Any]]] = {"raw-tcp": [], "raw-ipc": []}
    kv: dict[str, dict[str, Any]] = {}

    def progress(text: str) -> None:
        print(f"  .. {text}", flush=True)

    def baselines(label: str) -> None:
        for transport in ("tcp", "ipc"):
            progress(f"raw pyzmq {transport} ({label})")
            raw[f"raw-{transport}"].append(
                _raw_cell(peer, transport, False, geometry, sizes, timing, tmp)
            )

    baselines("before")
    for backend in backends:
        for auth in auths:
            progress(f"{backend} {auth}")
            kv[f"{backend}/{auth}"] = _kv_cell(peer, backend, auth, geometry, sizes, timing, tmp)
    for _ in range(timing.baseline_passes - 1):
        baselines("after")
    copies = {}
    for transport in ("tcp", "ipc"):
        progress(f"raw pyzmq {transport} + copy of each frame into a tensor")
        copies[f"raw-{transport}+copy"] = _raw_cell(
            peer, transport, True, geometry, sizes, timing, tmp
        )
    for auth in (a for a in auths if a in TAGGED_BASELINES):
        for transport in ("tcp", "ipc"):
            progress(f"raw pyzmq {transport} + {auth} of each frame on both ends")
            copies[f"raw-{transport}+{auth}"] = _raw_cell(
                peer, transport, False, geometry, sizes, timing, tmp, auth
            )
    return {"raw": raw, "kv": kv, "copies": copies}


# -- memcpy baseline --------------------------------------------------------------------------


def measure_memcpy(geometry: Geometry, sizes: list[int], timing: Timing) -> dict[str, Any]:
    """``dst.copy_(src)`` of each size's payload, one thread, in this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    try:
        for tokens in sizes:
            shape = geometry.page_shape(geometry.blocks_for(tokens))
            src = torch.randn(shape, dtype=geometry.torch_dtype)
            dst = torch.empty_like(src)
            nbytes = geometry.payload_bytes(tokens)

            def once(
                src: torch.Tensor = src, dst: torch.Tensor = dst, nbytes: int = nbytes
            ) -> float:
                start = time.perf_counter()  # one process: perf_counter is fine here
                dst.copy_(src)
                return nbytes / (time.perf_counter() - start) / 1e9

            for _ in range(3):
                once()
            results[str(tokens)] = {"bytes": nbytes, "gbps": summarize(_repeat(timing, once))}
    finally:
        torch.set_num_threads(threads)
    return results


# -- the section ------------------------------------------------------------------------------


def run(
    geometry: Geometry,
    sizes: list[int],
    timing: Timing,
    backends: list[str],
    auths: list[str],
) -> dict[str, Any]:
    """Every cell and baseline; ratios are against the median of the raw baseline passes."""
    memcpy = measure_memcpy(geometry, sizes, timing)
    tagged_cells = 2 * len([a for a in auths if a in TAGGED_BASELINES])
    cells_count = len(backends) * len(auths) + 2 * timing.baseline_passes + 2 + tagged_cells
    timeout = 300 + cells_count * len(sizes) * (timing.cell_s + 10)
    with tempfile.TemporaryDirectory(prefix="kvb-") as tmp:
        plan: dict[str, Any] = run_pair(
            _plan_main, (geometry.to_fields(), sizes, timing, backends, auths, tmp), timeout
        )
    baselines: dict[str, dict[str, Any]] = {"memcpy": memcpy}
    for name, passes in plan["raw"].items():
        baselines[name] = {}
        for tokens in sizes:
            key = str(tokens)
            medians = [p[key]["gbps"]["median"] for p in passes]
            baselines[name][key] = {
                "bytes": passes[0][key]["bytes"],
                "gbps": summarize(medians),  # median over the passes' medians
                "passes": [p[key]["gbps"] for p in passes],
            }
    baselines.update(plan["copies"])
    cells: list[dict[str, Any]] = []
    for backend in backends:
        for auth in auths:
            measured = plan["kv"][f"{backend}/{auth}"]
            for tokens in sizes:
                key = str(tokens)
                size = measured["sizes"][key]
                raw_name = RAW_FOR_BACKEND[backend]
                raw = baselines[raw_name][key]["gbps"]["median"]
                mem = baselines["memcpy"][key]["gbps"]["median"]
                tagged = baselines.get(f"{raw_name}+{auth}")
                cells.append(
                    {
                        "backend": backend,
                        "auth": auth,
                        "tokens": tokens,
                        "bytes": size["bytes"],
                        "acked_gbps": size["acked_gbps"],
                        "ready_gbps": size["ready_gbps"],
                        "raw_baseline": raw_name,
                        "ratio_raw": size["acked_gbps"]["median"] / raw,
                        "ratio_memcpy": size["acked_gbps"]["median"] / mem,
                        "ready_ratio_raw": size["ready_gbps"]["median"] / raw,
                        # against raw pyzmq carrying the same tag (sender tags each frame,
                        # receiver verifies it whole after it arrived; no copy into a pool)
                        "ratio_tagged_raw": (
                            size["acked_gbps"]["median"] / tagged[key]["gbps"]["median"]
                            if tagged
                            else None
                        ),
                        "sender_stats": measured["sender_stats"],
                        "receiver_stats": measured["receiver_stats"],
                    }
                )
    return {"cells": cells, "baselines": baselines}
