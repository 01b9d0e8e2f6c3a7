"""What encrypting KV pages (``--kv-encrypt``) costs, beside the plain MAC, in one run.

Two measurements, both on the default model's KV geometry (read from its config):

1. **crypto**: one core sealing a layer's page and verifying it (decrypting in place, for
   AES-256-GCM) as the receiver does, in GB/s, for the MAC (AES-256-GMAC) and encryption;
2. **channel**: whole requests through a real :class:`KVSender` -> :class:`KVReceiver` pair on
   loopback tcp (zmq and stream backends), layer by layer, timed from ``open`` to the decode
   side's ``on_ready``: median ms per request, goodput in GB/s, and the ms encryption adds
   (the two modes' requests alternate, so other load on the machine falls on both alike).

Sender and receiver share this process (two threads); the figures are for this machine only.

    .venv/bin/python benchmarks/kv_encryption.py [--tokens 512,2048] [--requests 20]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import threading
import time
from typing import Any

import structlog
import torch

from core.ticket import Fingerprint
from engine.kv_cache import KVCache
from kvtransfer.receiver import KVReceiver
from kvtransfer.sender import KVSender, TransferSpec
from kvtransfer.wire import FrameAuth

KEY = b"pdserve-kv-benchmark-fleet-key-0123456789"
MODES = {"gmac": FrameAuth(KEY), "gcm": FrameAuth(KEY, encrypt=True)}
BACKENDS = ("zmq", "stream")


def geometry(dtype: torch.dtype, block_size: int) -> dict[str, Any]:
    """The default model's KV layout (its config only: no weights are loaded)."""
    from engine.config import ModelConfig
    from engine.model_files import describe_model, resolve_model_path

    path = resolve_model_path(ModelConfig())
    spec = describe_model(str(path), path)
    return {
        "num_layers": spec.num_layers,
        "num_kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "block_size": block_size,
        "dtype": dtype,
    }


def _cache(geo: dict[str, Any], num_blocks: int) -> KVCache:
    return KVCache(
        geo["num_layers"],
        num_blocks,
        geo["block_size"],
        geo["num_kv_heads"],
        geo["head_dim"],
        geo["dtype"],
        torch.device("cpu"),
    )


def crypto(geo: dict[str, Any], tokens: int, seconds: float = 1.0) -> dict[str, float]:
    """GB/s of seal + verify of one layer's page (decrypting in place for gcm), one core."""
    blocks = -(-tokens // geo["block_size"])
    page = _cache(geo, blocks).kv[0:1]  # (1, 2, n, bs, KVH, D)
    page.copy_(torch.randn(page.shape))
    data = memoryview(page.contiguous().view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
    prefix = os.urandom(64)
    result = {}
    for name, auth in MODES.items():
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            tag, sent = auth.seal(prefix, data)
            assert isinstance(sent, memoryview)
            landed = memoryview(bytearray(sent)) if auth.encrypt else sent
            auth.verify(auth.flags, prefix, tag, landed)
            count += 1
        result[name] = count * data.nbytes / (time.perf_counter() - start) / 1e9
    return result


class Pair:
    """A started sender/receiver pair on loopback tcp for one backend and auth mode."""

    def __init__(self, backend: str, mode: str, geo: dict[str, Any], blocks: int) -> None:
        self.name = f"{backend}/{mode}"
        self.layers = geo["num_layers"]
        self.blocks = blocks
        fp = Fingerprint(
            model="bench",
            dtype=str(geo["dtype"]).removeprefix("torch."),
            block_size=geo["block_size"],
            num_layers=geo["num_layers"],
            num_kv_heads=geo["num_kv_heads"],
            head_dim=geo["head_dim"],
            backend=backend,
            integrity=MODES[mode].integrity,
        )
        self.ready: dict[str, float] = {}
        self.done = threading.Condition()
        auth = MODES[mode]
        self.dst = _cache(geo, blocks)
        self.receiver = KVReceiver(
            "tcp://127.0.0.1:0", self.dst, fp, auth, self._on_ready, self._on_failed
        )
        self.sender = KVSender(fp, FrameAuth(KEY, encrypt=auth.encrypt))
        self.endpoint = self.receiver.start()
        self.sender.start()
        self.count = 0

    def _on_ready(self, request_id: str, _token: int) -> None:
        with self.done:
            self.ready[request_id] = time.perf_counter()
            self.done.notify_all()

    def _on_failed(self, request_id: str, reason: str) -> None:
        raise SystemExit(f"{self.name}: transfer {request_id} failed: {reason}")

    def request(self, pages: torch.Tensor) -> float:
        """Seconds from ``open`` to the decode side's ``on_ready`` for one request."""
        self.count += 1
        tid, request = self.count.to_bytes(16, "big"), f"r{self.count}"
        blocks = list(range(self.blocks))
        self.receiver.expect(tid, request, blocks, 60.0)
        start = time.perf_counter()
        self.sender.open(TransferSpec(request, tid, self.endpoint, tuple(blocks)))
        for layer in range(self.layers):
            self.sender.send_pages(tid, layer, pages[layer : layer + 1])
        self.sender.finish(tid, 1)
        with self.done:
            if not self.done.wait_for(lambda: request in self.ready, timeout=60):
                raise SystemExit(f"{self.name}: request {request} timed out")
        return self.ready[request] - start

    def stop(self) -> None:
        self.sender.stop()
        self.receiver.stop()


def channel(backend: str, geo: dict[str, Any], tokens: int, requests: int) -> dict[str, Any]:
    """Median ms per request and goodput for every mode, their requests interleaved (so load
    from elsewhere on the machine falls on both alike)."""
    blocks = -(-tokens // geo["block_size"])
    source = _cache(geo, blocks)
    source.kv.copy_(torch.randn(source.kv.shape))
    pages = source.gather_pages(range(blocks))  # (L, 2, n, bs, KVH, D)
    pairs = {mode: Pair(backend, mode, geo, blocks) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    try:
        for n in range(requests + 2):  # two warm-ups: handshake, first allocations
            for mode, pair in pairs.items():
                elapsed = pair.request(pages)
                if n >= 2:
                    times[mode].append(elapsed)
        for pair in pairs.values():  # pages landed bit-exact, decrypted
            assert torch.equal(pair.dst.kv.view(torch.uint8), source.kv.view(torch.uint8))
    finally:
        for pair in pairs.values():
            pair.stop()
    nbytes = pages.numel() * pages.element_size()
    result = {}
    for mode, samples in times.items():
        median = statistics.median(samples)
        result[mode] = {"ms": median * 1e3, "gbps": nbytes / median / 1e9}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="512,2048", help="prompt lengths (comma-separated)")
    parser.add_argument("--requests", type=int, default=20, help="timed requests per cell")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    torch.set_num_threads(1)
    geo = geometry(getattr(torch, args.dtype), args.block_size)
    per_token = 2 * geo["num_layers"] * geo["num_kv_heads"] * geo["head_dim"]
    per_token *= torch.empty((), dtype=geo["dtype"]).element_size()
    print(f"default model KV: {geo} ({per_token} bytes per token), {os.cpu_count()} CPUs")
    print("\ncrypto, one core, seal + verify one layer's page (GB/s)")
    print(f"{'tokens':>7} {'page MB':>8} {'gmac':>7} {'gcm':>7}")
    sizes = [int(t) for t in args.tokens.split(",")]
    for tokens in sizes:
        rates = crypto(geo, tokens)
        mb = per_token * tokens / geo["num_layers"] / 1e6
        print(f"{tokens:>7} {mb:>8.2f} {rates['gmac']:>7.2f} {rates['gcm']:>7.2f}")
    print(f"\nchannel, loopback tcp, layerwise, median of {args.requests} requests")
    print(
        f"{'backend':>8} {'tokens':>7} {'MB':>7} {'gmac ms':>8} {'gcm ms':>8} "
        f"{'added ms':>9} {'gmac GB/s':>10} {'gcm GB/s':>9}"
    )
    for backend in BACKENDS:
        for tokens in sizes:
            cells = channel(backend, geo, tokens, args.requests)
            added = cells["gcm"]["ms"] - cells["gmac"]["ms"]
            mb = per_token * tokens / 1e6
            print(
                f"{backend:>8} {tokens:>7} {mb:>7.1f} {cells['gmac']['ms']:>8.2f} "
                f"{cells['gcm']['ms']:>8.2f} {added:>+9.2f} {cells['gmac']['gbps']:>10.2f} "
                f"{cells['gcm']['gbps']:>9.2f}"
            )


if __name__ == "__main__":
    main()
