"""Section 2 of ``benchmarks/kv_transfer.py``: exposed transfer time.

Exposed transfer time = from the end of the prefill's compute (the forward pass and sampling
return, on the prefill side) to the sequence being ready on the decode side (the receiver's
``on_ready``). Both ends are stamped with ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for
every process on the machine).

The prefill side is one process running the real engine on the real model, wired as
``prefill_service.worker.PrefillWorker`` wires it: layer-wise, the engine's layer sink hands each
layer's pages to ``KVSender.send_pages`` mid-forward; after-prefill, the step's output carries
every page and they are queued once, then ``finish`` sends DONE. The decode side is another
process with a :class:`KVReceiver` writing into a real :class:`KVCache`. The engine runs with
one torch thread, as each worker of ``pdserve up`` does on two cores.
"""

from __future__ import annotations

import os
import random
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from kv_common import (
    AUTH_MODES,
    Geometry,
    fingerprint_fields,
    recv_within,
    run_pair,
    stats_fields,
    summarize,
)

MODES = ("layerwise", "after-prefill")
TRANSPORT = "tcp"  # the default: `pdserve up` without --kv-transport
AUTH = "gmac"  # the default: `pdserve up` makes a fleet key unless --kv-insecure


def sender_main(
    peer: Connection,
    model_path: str,
    fingerprint_fields: dict[str, Any],
    key: bytes | None,
    checksum: bool,
    sizes: list[int],
    reps: int,
    seed: int,
) -> dict[str, Any]:
    import torch

    from core.sampling import SamplingParams
    from core.ticket import Fingerprint
    from engine.config import CacheConfig, EngineConfig, ModelConfig
    from engine.engine import Engine
    from engine.model_loader import load_model
    from engine.scheduler import ScheduledBatch
    from engine.sequence import Sequence
    from kvtransfer.sender import KVSender, TransferSpec
    from kvtransfer.wire import FrameAuth

    fingerprint = Fingerprint(**fingerprint_fields)
    max_blocks = -(-max(sizes) // fingerprint.block_size)
    peer.send(("kv", fingerprint_fields, max_blocks + 8, key, checksum, "tcp://127.0.0.1:*"))
    target = recv_within(peer, 120, "receiver endpoint")
    config = EngineConfig(
        model=ModelConfig(model=model_path, device="cpu"),
        cache=CacheConfig(block_size=fingerprint.block_size, num_blocks=max_blocks + 8),
        num_threads=1,
    )
    model, spec = load_model(config.model)
    engine = Engine(config, model, spec, sink=lambda outputs: None)
    kv = engine.kv_cache
    mine = (spec.fingerprint, str(kv.dtype).removeprefix("torch."), kv.block_size, kv.num_layers)
    theirs = (fingerprint.model, fingerprint.dtype, fingerprint.block_size, fingerprint.num_layers)
    if mine != theirs or (kv.num_kv_heads, kv.head_dim) != (
        fingerprint.num_kv_heads,
        fingerprint.head_dim,
    ):
        raise RuntimeError(f"the engine's KV does not match the fingerprint {fingerprint}")

    acked: dict[str, tuple[bool, float, str]] = {}
    done = threading.Condition()

    def on_sent(request_id: str, ok: bool, message: str) -> None:
        now = time.monotonic()
        with done:
            acked[request_id] = (ok, now, message)
            done.notify_all()

    sender = KVSender(fingerprint, FrameAuth(key, checksum), on_sent=on_sent)
    sender.start()
    transfers: dict[str, TransferSpec] = {}  # engine key -> transfer (PrefillWorker's map)

    def export_layer(key: str, layer: int, pages: torch.Tensor) -> None:
        transfer = transfers.get(key)
        if transfer is not None:
            sender.send_pages(transfer.transfer_id, layer, pages)

    compute_end = [0.0]
    execute = engine.runner.execute_step  # what Engine.step calls

    def timed_execute(batch: ScheduledBatch) -> tuple[list[Any], list[Any]]:
        sampled = execute(batch)
        compute_end[0] = time.monotonic()  # forward pass and sampling are done
        return sampled

    engine.runner.execute_step = timed_execute  # type: ignore[method-assign]
    rng = random.Random(seed)
    vocab_top = min(49000, spec.vocab_size)

    def once(tokens: int, mode: str) -> dict[str, float]:
        engine.set_layer_sink(export_layer if mode == "layerwise" else None)
        tid = os.urandom(16)
        rid = tid.hex()
        prompt = [rng.randrange(3, vocab_top) for _ in range(tokens)]
        seq = Sequence(
            request_id=rid,
            token_ids=prompt,
            num_prompt_tokens=tokens,
            sampling=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
            eos_token_ids=spec.eos_token_ids,
        )
        blocks = tuple(range(-(-tokens // fingerprint.block_size)))
        peer.send(("expect", tid, rid, list(blocks), 120.0))
        recv_within(peer, 30, "expect answer")
        transfer = TransferSpec(rid, tid, target, blocks)
        sender.open(transfer)  # as the worker does: before the prompt is submitted
        transfers[rid] = transfer
        engine.add(seq, export_kv=True)
        start = time.monotonic()
        outputs = engine.step()
        transfers.pop(rid, None)
        out = next(o for o in outputs if o.request_id == rid)
        if out.pages is not None:  # send-after-prefill: the worker queues all pages at once
            sender.send_pages(tid, 0, out.pages)
        sender.finish(tid, out.token_ids[0])
        peer.send(("wait", rid, 60.0))
        ready_ok, ready_at, reason = recv_within(peer, 90, "ready time")
        if not ready_ok:
            raise RuntimeError(f"receiver failed the transfer: {reason}")
        with done:
            if not done.wait_for(lambda: rid in acked, timeout=60):
                raise TimeoutError("no acknowledgement in 60 s")
            ok, acked_at, message = acked.pop(rid)
        if not ok:
            raise RuntimeError(f"transfer failed: {message}")
        return {
            "compute_s": compute_end[0] - start,
            "exposed_s": ready_at - compute_end[0],
            "start_to_ready_s": ready_at - start,  # includes any slowdown of the compute
            "acked_after_compute_s": acked_at - compute_end[0],
        }

    samples: dict[tuple[int, str], list[dict[str, float]]] = {
        (t, m): [] for t in sizes for m in MODES
    }
    try:
        for mode in MODES:  # warm-up: handshake, first forward passes
            once(min(sizes), mode)
        for _ in range(reps):
            for tokens in sizes:
                for mode in MODES:  # interleaved, so drifting background load hits both
                    samples[(tokens, mode)].append(once(tokens, mode))
    finally:
        sender.stop()
        peer.send(("close",))
    receiver_stats = recv_within(peer, 30, "receiver stats")
    rows = []
    for (tokens, mode), runs in samples.items():
        rows.append(
            {
                "tokens": tokens,
                "mode": mode,
                "compute_s": summarize([r["compute_s"] for r in runs]),
                "exposed_s": summarize([r["exposed_s"] for r in runs]),
                "start_to_ready_s": summarize([r["start_to_ready_s"] for r in runs]),
                "acked_after_compute_s": summarize([r["acked_after_compute_s"] for r in runs]),
                "runs": runs,
            }
        )
    return {
        "rows": rows,
        "sender_stats": stats_fields(sender.stats),
        "receiver_stats": receiver_stats,
    }


def run(model_path: str, sizes: list[int], reps: int, seed: int) -> dict[str, Any]:
    from engine.config import ModelConfig
    from engine.model_files import describe_model, resolve_model_path

    path = resolve_model_path(ModelConfig(model=model_path))
    spec = describe_model(model_path, path)
    geometry = Geometry(
        num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim
    )
    fingerprint = fingerprint_fields(spec.fingerprint, geometry, "zmq", AUTH)
    key, checksum = AUTH_MODES[AUTH]
    timeout = 300 + (reps + 1) * len(sizes) * 2 * (0.01 * max(sizes) + 10)
    result: dict[str, Any] = run_pair(
        sender_main, (str(path), fingerprint, key, checksum, sizes, reps, seed), timeout
    )
    by = {(r["tokens"], r["mode"]): r for r in result["rows"]}
    ratios = {}
    for tokens in sizes:
        layerwise = by[(tokens, "layerwise")]["exposed_s"]["median"]
        after = by[(tokens, "after-prefill")]["exposed_s"]["median"]
        ratios[str(tokens)] = layerwise / after if after > 0 else float("nan")
    result["ratio_layerwise_to_after"] = ratios
    result["transport"] = TRANSPORT
    result["auth"] = AUTH
    result["threads"] = 1
    return result
