"""kvtransfer.staging: the bounded pool of reused host buffers, and the CPU path (no copy)."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

import pytest
import torch

from core.ticket import Fingerprint
from kvtransfer import wire
from kvtransfer.datapath import Backend
from kvtransfer.send_commands import SendPages
from kvtransfer.sender import KVSender, TransferSpec
from kvtransfer.staging import (
    HostStager,
    StagedPages,
    StagingExhaustedError,
    StagingPool,
    stager_for,
)

MIB = 1 << 20


def test_a_released_buffer_is_handed_out_again() -> None:
    pool = StagingPool(4 * MIB)
    first = pool.acquire((2, 2, 3, 4, 2, 8), torch.float32)
    raw = first.raw
    pool.release(first)
    second = pool.acquire((2, 2, 3, 4, 2, 8), torch.float32)
    assert second.raw is raw
    assert second.tensor.data_ptr() == raw.data_ptr()


def test_near_sizes_share_a_buffer() -> None:
    pool = StagingPool(4 * MIB)
    with pool.lease((1000,), torch.uint8) as first:
        raw = first.raw
    with pool.lease((3000,), torch.uint8) as second:  # both round up to one 4 KiB granule
        assert second.raw is raw


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((1, 2, 3, 16, 2, 64), torch.float32),
        ((4, 2, 1, 16, 8, 128), torch.bfloat16),
        ((2, 2, 5, 4, 1, 8), torch.float16),
        ((3, 7), torch.int8),
        ((0, 2, 4), torch.float32),
    ],
)
def test_the_tensor_has_the_asked_shape_dtype_and_size(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    pool = StagingPool(16 * MIB)
    with pool.lease(shape, dtype) as buffer:
        assert buffer.tensor.shape == shape
        assert buffer.tensor.dtype == dtype
        assert buffer.tensor.is_contiguous()
        assert buffer.capacity >= buffer.tensor.numel() * buffer.tensor.element_size()
        assert buffer.capacity % 4096 == 0
        assert pool.lent_bytes == buffer.capacity
    assert pool.lent_bytes == 0


def test_buffers_are_pinned_only_where_cuda_is() -> None:
    pool = StagingPool(MIB)
    assert pool.pin is torch.cuda.is_available()
    with pool.lease((16,), torch.float32) as buffer:
        assert buffer.raw.is_pinned() is torch.cuda.is_available()


def test_beyond_the_bound_acquire_raises_a_named_error() -> None:
    pool = StagingPool(MIB)
    held = pool.acquire((MIB // 2,), torch.uint8)
    with pytest.raises(StagingExhaustedError, match="lent out"):
        pool.acquire((MIB,), torch.uint8)
    with pytest.raises(StagingExhaustedError, match="at most"):
        pool.acquire((MIB + 1,), torch.uint8, timeout_s=10.0)  # never fits: at once
    pool.release(held)
    assert pool.lent_bytes == 0


def test_beyond_the_bound_acquire_waits_for_a_release() -> None:
    pool = StagingPool(MIB)
    held = pool.acquire((MIB,), torch.uint8)
    threading.Timer(0.05, pool.release, (held,)).start()
    started = time.monotonic()
    again = pool.acquire((MIB,), torch.uint8, timeout_s=5.0)
    assert time.monotonic() - started < 4.0
    assert again.raw is held.raw


def test_a_timed_out_wait_leaks_nothing() -> None:
    pool = StagingPool(MIB)
    held = pool.acquire((MIB,), torch.uint8)
    with pytest.raises(StagingExhaustedError):
        pool.acquire((MIB,), torch.uint8, timeout_s=0.05)
    assert pool.lent_bytes == MIB
    pool.release(held)
    assert (pool.lent_bytes, pool.free_bytes) == (0, MIB)


def test_free_buffers_of_other_sizes_make_room() -> None:
    pool = StagingPool(MIB)
    with pool.lease((MIB // 2,), torch.uint8):
        pass
    with pool.lease((MIB // 4,), torch.uint8):
        pass
    assert pool.free_bytes == MIB // 2 + MIB // 4
    with pool.lease((MIB,), torch.uint8):  # both free ones are dropped for it
        assert pool.lent_bytes + pool.free_bytes <= pool.max_bytes


def test_a_lease_is_released_when_its_block_raises() -> None:
    pool = StagingPool(MIB)
    with pytest.raises(RuntimeError, match="boom"), pool.lease((64,), torch.float32):
        raise RuntimeError("boom")
    assert pool.lent_bytes == 0
    assert pool.free_bytes == 4096


def test_a_second_release_is_ignored() -> None:
    pool = StagingPool(MIB)
    buffer = pool.acquire((64,), torch.float32)
    pool.release(buffer)
    pool.release(buffer)
    assert (pool.lent_bytes, pool.free_bytes) == (0, 4096)


def test_a_cancelled_waiter_leaks_nothing() -> None:
    pool = StagingPool(MIB)
    held = pool.acquire((MIB,), torch.uint8)
    errors: queue.Queue[BaseException] = queue.Queue()

    def waiter() -> None:
        try:
            with pool.lease((MIB,), torch.uint8, timeout_s=0.1):
                raise AssertionError("no room was expected")
        except StagingExhaustedError as exc:  # the caller gave up
            errors.put(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    thread.join(5)
    assert isinstance(errors.get_nowait(), StagingExhaustedError)
    pool.release(held)
    assert pool.lent_bytes == 0


def test_a_bad_bound_or_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        StagingPool(0)
    with pytest.raises(ValueError, match="negative"):
        StagingPool(MIB).acquire((-1, 4), torch.float32)


def test_cpu_pages_pass_through_without_a_copy() -> None:
    pool = StagingPool(MIB)
    stager = HostStager(pool)
    pages = torch.arange(2 * 3 * 4, dtype=torch.float32).view(1, 2, 3, 4)
    staged = stager.stage(pages)
    assert staged.tensor is pages
    assert staged.buffer is None and staged.done is None
    assert staged.wait() is pages
    staged.release()  # nothing to give back
    assert (pool.lent_bytes, pool.free_bytes) == (0, 0)
    assert stager.streams == 0  # no CUDA stream (or event) made for CPU pages
    assert stager.try_stage(pages) is None and stager.misses == 0  # nothing to stage


def test_staged_pages_give_their_buffer_back_once() -> None:
    pool = StagingPool(MIB)
    buffer = pool.acquire((8,), torch.float32)
    staged = StagedPages(buffer.tensor, buffer, None, pool)
    staged.release()
    staged.release()
    assert (pool.lent_bytes, pool.free_bytes) == (0, 4096)


# -- the sender's use of it -------------------------------------------------------------------

SPEC = TransferSpec("req", b"t" * 16, "tcp://127.0.0.1:9", (3, 4))


@pytest.mark.parametrize("backend", ["stream", "zmq", "gloo"])
def test_the_sender_queues_cpu_pages_unstaged(backend: str) -> None:
    fingerprint = Fingerprint("m", "float32", 4, 3, 2, 8, backend)
    kv = KVSender(fingerprint, wire.FrameAuth(None), ack_timeout_s=0.05)
    assert (kv._stager is not None) is (backend == "stream")
    kv.open(SPEC)
    pages = torch.randn(1, 2, 2, 4, 2, 8)
    kv.send_pages(SPEC.transfer_id, 0, pages)
    commands = []
    while not kv._commands.empty():
        commands.append(kv._commands.get_nowait())
    sent = [c for c in commands if isinstance(c, SendPages)]
    assert len(sent) == 1 and sent[0].staged is None and sent[0].pages is pages
    assert sent[0].ready() is pages  # the CPU path sends the very tensor: no copy
    kv._release_bytes(sent[0])  # a dropped command frees its bytes (no buffer to give back)
    assert kv._stager is None or kv._stager.pool.lent_bytes == 0
    assert dataclasses.replace(sent[0]).staged is None


def test_only_the_stream_backend_stages() -> None:
    stager = stager_for(Backend.STREAM, MIB)
    assert stager is not None and stager.pool.max_bytes == MIB
    assert (stager.pool.lent_bytes, stager.pool.free_bytes, stager.streams) == (0, 0, 0)
    for backend in (Backend.ZMQ, Backend.GLOO, Backend.NCCL):
        assert stager_for(backend, MIB) is None
