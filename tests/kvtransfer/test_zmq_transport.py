"""KVSender -> KVReceiver over real ZeroMQ sockets (tcp and ipc), with small KV caches.

Pages must land bit-exact in the reserved blocks and nowhere else; every way a transfer can end
(done, lease expired, cancelled, corrupted, refused) must reach exactly one callback, and no frame
of an ended transfer may touch the cache. Raw frames come from a plain DEALER socket where the
test needs a misbehaving sender.
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import zmq

from engine.kv_cache import KVCache
from kvtransfer import wire
from kvtransfer.zmq_transport import KVReceiver, KVSender, OutgoingTransfer

TIMEOUT_S = 10.0
LONG_LEASE_S = 120.0
LAYERS, BS, KVH, HD = 3, 4, 2, 8


def make_cache(
    num_blocks: int = 16,
    *,
    num_layers: int = LAYERS,
    block_size: int = BS,
    head_dim: int = HD,
    dtype: torch.dtype = torch.float32,
) -> KVCache:
    return KVCache(num_layers, num_blocks, block_size, KVH, head_dim, dtype, torch.device("cpu"))


def filled_cache(seed: int = 0, **kwargs: object) -> KVCache:
    cache = make_cache(**kwargs)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=generator))
    return cache


def tid(n: int) -> bytes:
    return n.to_bytes(16, "little")


class Recorder:
    """Collects every callback, and lets the test wait for a condition on them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.ready: dict[str, list[int]] = defaultdict(list)
        self.failed: dict[str, list[str]] = defaultdict(list)
        self.sent: dict[str, list[tuple[bool, str]]] = defaultdict(list)

    def on_ready(self, request_id: str, first_token_id: int) -> None:
        with self.cond:
            self.ready[request_id].append(first_token_id)
            self.cond.notify_all()

    def on_failed(self, request_id: str, reason: str) -> None:
        with self.cond:
            self.failed[request_id].append(reason)
            self.cond.notify_all()

    def on_sent(self, request_id: str, ok: bool, message: str) -> None:
        with self.cond:
            self.sent[request_id].append((ok, message))
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], what: str = "callbacks") -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, TIMEOUT_S), f"timed out waiting for {what}"


class Harness:
    """A receiver over ``dst`` and a sender, both started, sharing one recorder."""

    def __init__(self, bind: str, dst: KVCache, **receiver_kwargs: bool) -> None:
        self.rec = Recorder()
        self.dst = dst
        self.receiver = KVReceiver(
            bind, dst, self.rec.on_ready, self.rec.on_failed, **receiver_kwargs
        )
        self.sender: KVSender | None = None
        self.dealers: list[zmq.Socket[bytes]] = []
        self.endpoint = self.receiver.start()

    def start_sender(self, **kwargs: object) -> KVSender:
        self.sender = KVSender(on_sent=self.rec.on_sent, **kwargs)  # type: ignore[arg-type]
        self.sender.start()
        return self.sender

    def send(
        self,
        request_id: str,
        transfer_id: bytes,
        block_ids: list[int],
        pages: torch.Tensor,
        first_token_id: int = 7,
    ) -> None:
        sender = self.sender or self.start_sender()
        sender.submit(
            OutgoingTransfer(
                request_id, transfer_id, self.endpoint, tuple(block_ids), pages, first_token_id
            )
        )

    def dealer(self) -> zmq.Socket[bytes]:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
        sock.connect(self.endpoint)
        self.dealers.append(sock)
        return sock

    def close(self) -> None:
        if self.sender is not None:
            self.sender.stop()
        self.receiver.stop()
        for sock in self.dealers:
            sock.close(linger=0)


@pytest.fixture(params=["tcp", "ipc"])
def bind(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "tcp":
        return "tcp://127.0.0.1:0"
    path: Path = tmp_path_factory.mktemp("kv") / "r.sock"
    assert len(str(path)) < 100, "ipc path too long for a unix socket"
    return f"ipc://{path}"


@pytest.fixture
def make_harness(bind: str) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(dst: KVCache | None = None, **receiver_kwargs: bool) -> Harness:
        harness = Harness(bind, dst if dst is not None else make_cache(), **receiver_kwargs)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


@pytest.fixture
def h(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()


def page_frames(
    transfer_id: bytes,
    pages: torch.Tensor,
    block_ids: list[int],
    layer_start: int = 0,
    *,
    crc: int | str | None = "auto",
) -> list[bytes]:
    """A PAGE message as a sender would build it; ``crc`` may be forced to a wrong value."""
    payload = pages.contiguous().view(torch.uint8).numpy().tobytes()
    header = wire.PageHeader(
        transfer_id=transfer_id,
        layer_start=layer_start,
        layer_end=layer_start + pages.shape[0],
        block_ids=tuple(block_ids),
        block_size=pages.shape[3],
        num_kv_heads=pages.shape[4],
        head_dim=pages.shape[5],
        dtype=pages.dtype,
        payload_nbytes=len(payload),
        crc32=wire.checksum(payload) if crc == "auto" else crc,  # type: ignore[arg-type]
    )
    return [wire.encode(header), payload]


def done_frame(transfer_id: bytes, first_token_id: int = 7, num_layers: int = LAYERS) -> bytes:
    return wire.encode(wire.DoneHeader(transfer_id, first_token_id, num_layers))


def recv_ack(sock: zmq.Socket[bytes]) -> wire.AckHeader:
    header = wire.decode(sock.recv())
    assert isinstance(header, wire.AckHeader)
    return header


def untouched(cache: KVCache) -> bool:
    return not cache.kv.any()


# -- the happy path -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pages_arrive_bit_exact_in_the_reserved_blocks(
    make_harness: Callable[..., Harness], dtype: torch.dtype
) -> None:
    src = filled_cache(dtype=dtype)
    h = make_harness(make_cache(dtype=dtype))
    src_blocks, dst_blocks = [1, 2, 3], [9, 4, 12]
    h.receiver.expect(tid(1), "req-1", dst_blocks, LONG_LEASE_S)
    assert h.receiver.pending() == 1
    h.send("sender-1", tid(1), dst_blocks, src.gather_pages(src_blocks), first_token_id=4242)
    h.rec.wait(lambda: "req-1" in h.rec.ready and "sender-1" in h.rec.sent)

    assert h.rec.ready["req-1"] == [4242]
    assert h.rec.sent["sender-1"] == [(True, "")]
    assert not h.rec.failed
    assert torch.equal(h.dst.kv[:, :, dst_blocks], src.kv[:, :, src_blocks])
    others = [b for b in range(h.dst.num_blocks) if b not in dst_blocks]
    assert not h.dst.kv[:, :, others].any()
    assert h.receiver.pending() == 0
    counters = h.receiver.counters
    assert (counters.pages, counters.completed, counters.failed) == (LAYERS, 1, 0)
    assert counters.bytes == 3 * src.bytes_per_block
    assert h.sender is not None and h.sender.counters.acked == 1


def test_unchecksummed_pages_arrive(h: Harness) -> None:
    src = filled_cache(seed=1)
    h.start_sender(checksum=False)
    h.receiver.expect(tid(2), "r", [0, 5], LONG_LEASE_S)
    h.send("s", tid(2), [0, 5], src.gather_pages([7, 8]))
    h.rec.wait(lambda: "r" in h.rec.ready and "s" in h.rec.sent)
    assert h.rec.sent["s"] == [(True, "")]
    assert torch.equal(h.dst.kv[:, :, [0, 5]], src.kv[:, :, [7, 8]])


def test_pages_from_a_partial_layer_range_and_raw_dealer(h: Harness) -> None:
    """Pages may cover several layers at once; DONE needs every layer seen."""
    src = filled_cache(seed=2)
    h.receiver.expect(tid(3), "r", [2, 3], LONG_LEASE_S)
    sock = h.dealer()
    sock.send_multipart(page_frames(tid(3), src.gather_pages([0, 1], slice(0, 2)), [2, 3], 0))
    sock.send_multipart(page_frames(tid(3), src.gather_pages([0, 1], slice(2, 3)), [2, 3], 2))
    sock.send(done_frame(tid(3), first_token_id=99))
    assert recv_ack(sock).status is wire.AckStatus.OK
    h.rec.wait(lambda: "r" in h.rec.ready)
    assert h.rec.ready["r"] == [99]
    assert torch.equal(h.dst.kv[:, :, [2, 3]], src.kv[:, :, [0, 1]])


# -- transfers that end early ---------------------------------------------------------------


def test_lease_expiry_fails_the_transfer_and_late_pages_are_dropped(h: Harness) -> None:
    src = filled_cache(seed=3)
    h.receiver.expect(tid(4), "r", [1, 2], lease_s=0.05)
    h.rec.wait(lambda: "r" in h.rec.failed, "lease expiry")
    assert "lease expired" in h.rec.failed["r"][0]
    assert h.receiver.pending() == 0
    h.send("s", tid(4), [1, 2], src.gather_pages([3, 4]))
    h.rec.wait(lambda: "s" in h.rec.sent)
    ok, message = h.rec.sent["s"][0]
    assert not ok and "expired" in message
    assert untouched(h.dst)
    assert h.receiver.counters.dropped_frames == LAYERS + 1  # every page and the DONE
    assert h.rec.failed["r"] == [h.rec.failed["r"][0]] and not h.rec.ready
    assert h.receiver.counters.failed == 1


def test_cancel_before_sending_writes_nothing(h: Harness) -> None:
    src = filled_cache(seed=4)
    h.receiver.expect(tid(5), "r", [1, 2], LONG_LEASE_S)
    assert h.receiver.cancel(tid(5)) is True
    assert h.receiver.cancel(tid(5)) is False
    assert h.receiver.pending() == 0
    h.send("s", tid(5), [1, 2], src.gather_pages([3, 4]))
    h.rec.wait(lambda: "s" in h.rec.sent)
    assert h.rec.sent["s"][0][0] is False
    assert untouched(h.dst)
    assert not h.rec.ready and not h.rec.failed  # cancelling is the owner's act: no callback


def test_duplicate_transfer_after_completion_is_dropped(h: Harness) -> None:
    src = filled_cache(seed=5)
    h.receiver.expect(tid(6), "r", [10, 11], LONG_LEASE_S)
    h.send("first", tid(6), [10, 11], src.gather_pages([0, 1]))
    h.rec.wait(lambda: "first" in h.rec.sent)
    assert h.rec.sent["first"] == [(True, "")]
    before = h.dst.kv.clone()
    dropped = h.receiver.counters.dropped_frames
    h.send("again", tid(6), [10, 11], src.gather_pages([5, 6]))
    h.rec.wait(lambda: "again" in h.rec.sent)
    assert h.rec.sent["again"][0][0] is False
    assert torch.equal(h.dst.kv, before)
    assert h.receiver.counters.dropped_frames == dropped + LAYERS + 1
    assert h.rec.ready["r"] == [7] and h.receiver.counters.completed == 1


def test_corrupted_payload_fails_the_transfer_before_any_write(h: Harness) -> None:
    src = filled_cache(seed=6)
    h.receiver.expect(tid(7), "r", [1, 2], LONG_LEASE_S)
    sock = h.dealer()
    header, payload = page_frames(tid(7), src.gather_pages([3, 4], slice(0, 1)), [1, 2])
    decoded = wire.decode(header)
    assert isinstance(decoded, wire.PageHeader) and decoded.crc32 is not None
    bad = wire.encode(wire.PageHeader(**{**decoded.__dict__, "crc32": decoded.crc32 ^ 1}))
    sock.send_multipart([bad, payload])
    ack = recv_ack(sock)
    assert ack.status is wire.AckStatus.FAILED and "checksum" in ack.message
    h.rec.wait(lambda: "r" in h.rec.failed)
    assert "checksum" in h.rec.failed["r"][0]
    assert untouched(h.dst) and h.receiver.pending() == 0
    # the rest of that transfer is dropped, not written
    sock.send_multipart(page_frames(tid(7), src.gather_pages([3, 4], slice(1, 2)), [1, 2], 1))
    sock.send(done_frame(tid(7)))
    assert recv_ack(sock).status is wire.AckStatus.FAILED
    assert untouched(h.dst)
    assert h.receiver.counters.dropped_frames == 2
    assert h.receiver.counters.pages == 0 and not h.rec.ready


def test_payload_flipped_byte_is_caught(h: Harness) -> None:
    src = filled_cache(seed=7)
    h.receiver.expect(tid(8), "r", [1], LONG_LEASE_S)
    sock = h.dealer()
    header, payload = page_frames(tid(8), src.gather_pages([3], slice(0, 1)), [1])
    corrupted = bytearray(payload)
    corrupted[17] ^= 0x04
    sock.send_multipart([header, bytes(corrupted)])
    h.rec.wait(lambda: "r" in h.rec.failed)
    assert "checksum" in h.rec.failed["r"][0] and untouched(h.dst)


def page_for(src: KVCache, block_ids: tuple[int, ...] = (1, 2), layer: int = 0) -> list[bytes]:
    """One layer's PAGE for transfer 9, claiming to be ``layer``."""
    pages = src.gather_pages(range(len(block_ids)), slice(0, 1))
    return page_frames(tid(9), pages, list(block_ids), layer)


@pytest.mark.parametrize(
    ("frames_for", "reason"),
    [
        (lambda src: page_for(src, (1, 3)), "outside the reservation"),  # only 1, 2 reserved
        (lambda src: page_for(src, layer=LAYERS), "layer"),  # the receiver has no such layer
        (lambda src: [page_for(src)[0], b"\0" * 16], "payload of"),  # size disagrees
        (lambda src: page_for(src)[:1], "payloads"),  # header without its payload frame
        (lambda src: [done_frame(tid(9))], "layers missing"),  # DONE before every layer
        (lambda src: [done_frame(tid(9), num_layers=LAYERS + 1)], "DONE"),
        (lambda src: [wire.encode(wire.AbortHeader(tid(9), "prefill died"))], "prefill died"),
        (lambda src: [wire.encode(wire.AckHeader(tid(9), wire.AckStatus.OK, ""))], "ACK"),
    ],
    ids=[
        "foreign-blocks",
        "bad-layer",
        "short-payload",
        "no-payload",
        "done-early",
        "done-layers",
        "abort",
        "stray-ack",
    ],
)
def test_refused_frames_fail_the_transfer_without_writing(
    h: Harness, frames_for: Callable[[KVCache], list[bytes]], reason: str
) -> None:
    src = filled_cache(seed=8)
    h.receiver.expect(tid(9), "r", [1, 2], LONG_LEASE_S)
    sock = h.dealer()
    sock.send_multipart(frames_for(src))
    ack = recv_ack(sock)
    assert ack.status is wire.AckStatus.FAILED and reason in ack.message
    h.rec.wait(lambda: "r" in h.rec.failed)
    assert reason in h.rec.failed["r"][0]
    assert untouched(h.dst) and h.receiver.pending() == 0 and not h.rec.ready


def test_geometry_mismatch_is_refused(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(make_cache(head_dim=HD // 2))
    src = filled_cache(seed=9)
    h.receiver.expect(tid(10), "r", [1, 2], LONG_LEASE_S)
    h.send("s", tid(10), [1, 2], src.gather_pages([0, 1]))
    h.rec.wait(lambda: "r" in h.rec.failed and "s" in h.rec.sent)
    assert "geometry" in h.rec.failed["r"][0]
    ok, message = h.rec.sent["s"][0]
    assert not ok and "geometry" in message
    assert untouched(h.dst)


def test_dtype_mismatch_is_refused(make_harness: Callable[..., Harness]) -> None:
    h = make_harness(make_cache(dtype=torch.float16))
    src = filled_cache(seed=10)
    h.receiver.expect(tid(11), "r", [1], LONG_LEASE_S)
    h.send("s", tid(11), [1], src.gather_pages([0]))
    h.rec.wait(lambda: "r" in h.rec.failed and "s" in h.rec.sent)
    assert "geometry" in h.rec.failed["r"][0] and untouched(h.dst)


def test_garbage_frames_are_dropped_and_the_transfer_goes_on(h: Harness) -> None:
    src = filled_cache(seed=11)
    h.receiver.expect(tid(12), "r", [4], LONG_LEASE_S)
    sock = h.dealer()  # one socket, so the receiver sees the frames in this order
    sock.send(b"not a header")
    sock.send_multipart([b"PDKV" + b"\0" * 40, b"x"])
    sock.send_multipart(page_frames(tid(12), src.gather_pages([2]), [4]))
    sock.send(done_frame(tid(12), first_token_id=5))
    assert recv_ack(sock).status is wire.AckStatus.OK
    h.rec.wait(lambda: "r" in h.rec.ready)
    assert h.receiver.counters.dropped_frames == 2
    assert h.receiver.pending() == 0 and h.rec.ready["r"] == [5]
    assert torch.equal(h.dst.kv[:, :, 4], src.kv[:, :, 2])


def test_unknown_transfer_is_nacked(h: Harness) -> None:
    src = filled_cache(seed=12)
    h.send("s", tid(13), [1], src.gather_pages([0]))
    h.rec.wait(lambda: "s" in h.rec.sent)
    assert h.rec.sent["s"][0][0] is False
    assert untouched(h.dst)


def test_sender_times_out_without_a_receiver(tmp_path_factory: pytest.TempPathFactory) -> None:
    rec = Recorder()
    sender = KVSender(on_sent=rec.on_sent, ack_timeout_s=0.2)
    sender.start()
    try:
        endpoint = f"ipc://{tmp_path_factory.mktemp('kv')}/nobody.sock"
        pages = make_cache().gather_pages([0])
        sender.submit(OutgoingTransfer("s", tid(14), endpoint, (0,), pages, 1))
        rec.wait(lambda: "s" in rec.sent)
        ok, message = rec.sent["s"][0]
        assert not ok and "acknowledgement" in message
        assert sender.pending() == 0 and sender.counters.failed == 1
    finally:
        sender.stop()


# -- many transfers, random failures --------------------------------------------------------


def test_many_transfers_with_injected_failures_account_for_everything(
    make_harness: Callable[..., Harness],
) -> None:
    rng = random.Random(2024)
    kinds = ["ok"] * 120 + ["cancel"] * 30 + ["expire"] * 25 + ["corrupt"] * 25
    rng.shuffle(kinds)
    # every transfer owns two distinct destination blocks
    h = make_harness(make_cache(num_blocks=2 * len(kinds)))
    run_many(h, filled_cache(seed=13), kinds, rng)


def run_many(h: Harness, src: KVCache, kinds: list[str], rng: random.Random) -> None:
    plan = []
    for n, kind in enumerate(kinds):
        dst_blocks = [2 * n, 2 * n + 1]
        rng.shuffle(dst_blocks)
        src_blocks = rng.sample(range(src.num_blocks), 2)
        lease = 0.05 if kind == "expire" else LONG_LEASE_S
        h.receiver.expect(tid(1000 + n), f"r{n}", dst_blocks, lease)
        plan.append((n, kind, dst_blocks, src_blocks))
    for n, kind, _, _ in plan:
        if kind == "cancel":
            assert h.receiver.cancel(tid(1000 + n))
    expiring = {f"r{n}" for n, kind, _, _ in plan if kind == "expire"}
    h.rec.wait(lambda: expiring <= h.rec.failed.keys(), "leases to expire")

    sock = h.dealer()
    for n, kind, dst_blocks, src_blocks in plan:
        pages = src.gather_pages(src_blocks)
        if kind == "corrupt":
            header, payload = page_frames(tid(1000 + n), pages[:1], dst_blocks, crc=0)
            sock.send_multipart([header, payload])
            for layer in range(1, LAYERS):
                sock.send_multipart(
                    page_frames(tid(1000 + n), pages[layer : layer + 1], dst_blocks, layer)
                )
            sock.send(done_frame(tid(1000 + n)))
        else:
            h.send(f"s{n}", tid(1000 + n), dst_blocks, pages, first_token_id=n)

    submitted = {f"s{n}" for n, kind, _, _ in plan if kind != "corrupt"}
    fails = {f"r{n}" for n, kind, _, _ in plan if kind in ("expire", "corrupt")}
    oks = {f"r{n}" for n, kind, _, _ in plan if kind == "ok"}
    h.rec.wait(
        lambda: (
            submitted <= h.rec.sent.keys()
            and fails <= h.rec.failed.keys()
            and oks <= h.rec.ready.keys()
        ),
        "every transfer to end",
    )
    # the corrupt transfers' dealer gets a NACK for the bad page and one for its DONE
    num_corrupt = kinds.count("corrupt")
    acks = [recv_ack(sock) for _ in range(2 * num_corrupt)]
    assert all(a.status is wire.AckStatus.FAILED for a in acks)

    assert h.receiver.pending() == 0
    assert h.sender is not None and h.sender.pending() == 0
    assert set(h.rec.ready) == oks and set(h.rec.failed) == fails
    assert all(len(v) == 1 for v in [*h.rec.ready.values(), *h.rec.failed.values()])
    assert all(len(v) == 1 for v in h.rec.sent.values())
    for n, kind, dst_blocks, src_blocks in plan:
        if kind == "corrupt":
            assert not h.dst.kv[:, :, dst_blocks].any(), n
            continue
        ok, _ = h.rec.sent[f"s{n}"][0]
        assert ok is (kind == "ok"), (n, kind)
        if kind == "ok":
            assert h.rec.ready[f"r{n}"] == [n]
            assert torch.equal(h.dst.kv[:, :, dst_blocks], src.kv[:, :, src_blocks]), n
        else:
            assert not h.dst.kv[:, :, dst_blocks].any(), (n, kind)
    counters = h.receiver.counters
    assert counters.completed == len(oks)
    assert counters.failed == len(fails)
    assert counters.pages == LAYERS * len(oks)


# -- regressions ----------------------------------------------------------------------------------


def test_done_requires_every_reserved_block(h: Harness) -> None:
    """DONE is refused unless every reserved block arrived for every layer: an unwritten block
    would keep stale KV, possibly another request's."""
    src = filled_cache(seed=14)
    h.receiver.expect(tid(20), "r", [1, 2], LONG_LEASE_S)
    sock = h.dealer()
    # every layer arrives, but only for block 1: block 2 is never written
    sock.send_multipart(page_frames(tid(20), src.gather_pages([0]), [1]))
    sock.send(done_frame(tid(20)))
    recv_ack(sock)
    h.rec.wait(lambda: "r" in h.rec.ready or "r" in h.rec.failed)
    assert "r" in h.rec.failed and not h.rec.ready


def test_blocks_may_arrive_in_separate_pages(h: Harness) -> None:
    src = filled_cache(seed=16)
    h.receiver.expect(tid(23), "r", [5, 9], LONG_LEASE_S)
    sock = h.dealer()
    for layer in range(LAYERS):
        for src_block, dst_block in [(3, 9), (2, 5)]:
            page = src.gather_pages([src_block], slice(layer, layer + 1))
            sock.send_multipart(page_frames(tid(23), page, [dst_block], layer))
    sock.send(done_frame(tid(23), first_token_id=8))
    assert recv_ack(sock).status is wire.AckStatus.OK
    h.rec.wait(lambda: "r" in h.rec.ready)
    assert torch.equal(h.dst.kv[:, :, [5, 9]], src.kv[:, :, [2, 3]])


def test_receiver_without_verification_skips_the_checksum(
    make_harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``verify_checksum=False`` the receiver computes no checksum (it used to ignore the
    flag)."""
    threads: list[str] = []
    real = wire.checksum

    def counting(payload: memoryview | bytes) -> int:
        threads.append(threading.current_thread().name)
        return real(payload)

    monkeypatch.setattr(wire, "checksum", counting)
    h = make_harness(verify_checksum=False)
    src = filled_cache(seed=15)
    h.receiver.expect(tid(21), "r", [1], LONG_LEASE_S)
    h.send("s", tid(21), [1], src.gather_pages([0]))
    h.rec.wait(lambda: "r" in h.rec.ready and "s" in h.rec.sent)
    assert "kv-sender" in threads
    assert "kv-receiver" not in threads


def fake_receiver(replies: Callable[[bytes], list[bytes]]) -> tuple[str, threading.Thread]:
    """A ROUTER that answers a transfer's DONE with the given frames, then exits."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))
    sock.bind("tcp://127.0.0.1:0")
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def serve() -> None:
        try:
            while True:
                peer, header, *_ = sock.recv_multipart()
                decoded = wire.decode(header)
                if isinstance(decoded, wire.DoneHeader):
                    for frame in replies(decoded.transfer_id):
                        sock.send_multipart([peer, frame])
                    return
        finally:
            sock.close(linger=0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return endpoint, thread


def test_sender_ignores_non_ack_frames_for_a_transfer() -> None:
    """A stray non-ACK frame naming a transfer must not consume it: its ACK still counts (the
    sender used to drop the transfer and never call on_sent)."""
    endpoint, thread = fake_receiver(
        lambda t: [
            wire.encode(wire.DoneHeader(t, 1, 1)),  # not an ACK: must be ignored
            wire.encode(wire.AckHeader(t, wire.AckStatus.OK, "")),
        ]
    )
    rec = Recorder()
    sender = KVSender(on_sent=rec.on_sent, ack_timeout_s=LONG_LEASE_S)
    sender.start()
    try:
        sender.submit(
            OutgoingTransfer("s", tid(22), endpoint, (0,), make_cache().gather_pages([0]), 1)
        )
        thread.join(TIMEOUT_S)
        assert not thread.is_alive(), "the fake receiver never saw the DONE"
        with rec.cond:
            rec.cond.wait_for(lambda: "s" in rec.sent, 3.0)
        assert rec.sent.get("s") == [(True, "")]
    finally:
        sender.stop()
