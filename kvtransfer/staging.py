"""Host staging for KV pages that leave a GPU: a bounded pool of reused host buffers, and the
side-stream copy that fills them while the next layer computes.

A socket backend (zmq, stream) sends bytes from host memory. Without staging, a CUDA page is
copied to fresh pageable memory on the compute stream (``pages.cpu()``): the engine thread
waits for it, and the driver bounces it through a pinned buffer of its own. With staging::

    compute stream:  layer l ──●(ready)── layer l+1 ── layer l+2 ...
                               │
    side stream:               └─wait─ copy D2H (non_blocking) into pinned ──●(done)
                                                                             │
    sender thread:                                          done.synchronize ┴─ send ─ release

:meth:`HostStager.stage` records ``ready`` on the compute stream after the layer's pages were
gathered, makes the side stream wait on it, copies into a pinned buffer of the
:class:`StagingPool` and records ``done``; the sending thread waits on ``done``
(:meth:`StagedPages.wait`) before it reads the bytes, and releases the buffer once they are
sent or dropped. CPU pages are handed through as they are: no pool buffer, no copy.

Buffers are pinned only when CUDA is available (pinning needs a driver); otherwise they are
plain host tensors, so the pool's bookkeeping is testable on any machine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtransfer.modes import Backend

__all__ = [
    "HostStager",
    "StagedPages",
    "StagingBuffer",
    "StagingExhaustedError",
    "StagingPool",
    "stager_for",
]

_GRANULE = 4096  # buffer sizes are rounded up to this, so near sizes share buffers


class StagingExhaustedError(RuntimeError):
    """No staging buffer could be had within the pool's bound (in time, or at all)."""


@dataclass(eq=False)
class StagingBuffer:
    """One pooled host buffer, lent out by :meth:`StagingPool.acquire` until released.

    ``tensor`` views the first bytes of ``raw`` in the asked-for shape and dtype; it is valid
    only until the buffer is released (the pool hands ``raw`` out again)."""

    raw: torch.Tensor  # (capacity,) uint8, pinned where CUDA is available
    tensor: torch.Tensor
    released: bool = False

    @property
    def capacity(self) -> int:
        return self.raw.numel()


class StagingPool:
    """Host buffers reused across transfers, at most ``max_bytes`` of them in all (lent out
    plus kept free).

    :meth:`acquire` reuses a free buffer of the same (rounded) size, else allocates one,
    dropping free buffers of other sizes to stay within the bound; when the lent-out buffers
    alone leave no room it waits up to ``timeout_s`` for a release, then raises
    :class:`StagingExhaustedError` (at once for a request larger than the bound). Every
    acquired buffer must be released exactly once: use :meth:`lease`, or release in a
    ``finally``; a second release of the same buffer is ignored. Thread-safe."""

    def __init__(self, max_bytes: int, pin: bool | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        self.max_bytes = max_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self._free: dict[int, list[torch.Tensor]] = {}  # capacity -> free raw buffers
        self._lent_bytes = 0
        self._free_bytes = 0
        self._cond = threading.Condition()

    @property
    def lent_bytes(self) -> int:
        """Bytes of the buffers lent out now."""
        return self._lent_bytes

    @property
    def free_bytes(self) -> int:
        """Bytes of the free buffers kept for reuse."""
        return self._free_bytes

    def acquire(
        self, shape: Sequence[int], dtype: torch.dtype, timeout_s: float = 0.0
    ) -> StagingBuffer:
        """A buffer whose ``tensor`` is ``shape`` of ``dtype`` (contents undefined)."""
        nbytes = _nbytes(shape, dtype)
        capacity = max(_GRANULE, -(-nbytes // _GRANULE) * _GRANULE)
        if capacity > self.max_bytes:
            raise StagingExhaustedError(
                f"{nbytes} bytes of staging asked for, the pool holds {self.max_bytes} at most"
            )
        deadline = time.monotonic() + timeout_s
        with self._cond:
            raw = self._take(capacity)
            while raw is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StagingExhaustedError(
                        f"no staging for {nbytes} bytes in {timeout_s:.1f}s: "
                        f"{self._lent_bytes} of {self.max_bytes} bytes lent out"
                    )
                self._cond.wait(left)
                raw = self._take(capacity)
            self._lent_bytes += capacity
        view = raw[:nbytes].view(dtype).view(tuple(shape))
        return StagingBuffer(raw, view)

    def release(self, buffer: StagingBuffer) -> None:
        """Give ``buffer`` back for reuse (its ``tensor`` must no longer be read)."""
        with self._cond:
            if buffer.released:
                return
            buffer.released = True
            self._lent_bytes -= buffer.capacity
            self._free.setdefault(buffer.capacity, []).append(buffer.raw)
            self._free_bytes += buffer.capacity
            self._cond.notify_all()

    @contextmanager
    def lease(
        self, shape: Sequence[int], dtype: torch.dtype, timeout_s: float = 0.0
    ) -> Iterator[StagingBuffer]:
        """:meth:`acquire` for a ``with`` block: released however the block ends."""
        buffer = self.acquire(shape, dtype, timeout_s)
        try:
            yield buffer
        finally:
            self.release(buffer)

    def _take(self, capacity: int) -> torch.Tensor | None:
        """A free buffer of ``capacity``, or a new one if the bound allows (free buffers of
        other sizes are dropped to make room); None when the lent-out ones leave no room.
        Holds the lock."""
        same = self._free.get(capacity)
        if same:
            self._free_bytes -= capacity
            return same.pop()
        if self._lent_bytes + capacity > self.max_bytes:
            return None
        while self._lent_bytes + self._free_bytes + capacity > self.max_bytes:
            size, buffers = next((s, b) for s, b in self._free.items() if b)
            buffers.pop()
            self._free_bytes -= size
        return torch.empty(capacity, dtype=torch.uint8, pin_memory=self.pin)


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    count = 1
    for size in shape:
        if size < 0:
            raise ValueError(f"negative size in shape {tuple(shape)}")
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()


@dataclass(eq=False)
class StagedPages:
    """Pages on their way to host memory. ``tensor`` is readable once :meth:`wait` returned;
    :meth:`release` gives its staging buffer back (call it once the bytes are sent or
    dropped; calling it again is harmless). CPU pages carry no buffer and no event."""

    tensor: torch.Tensor
    buffer: StagingBuffer | None = None
    done: Any = None  # torch.cuda.Event recorded on the side stream after the copy
    pool: StagingPool | None = field(default=None, repr=False)

    def wait(self) -> torch.Tensor:
        """The host pages, after their copy finished (blocks this thread, not the GPU)."""
        if self.done is not None:
            self.done.synchronize()
        return self.tensor

    def release(self) -> None:
        if self.buffer is not None and self.pool is not None:
            if self.done is not None:
                self.done.synchronize()  # a copy still in flight must not land in a reused buffer
            self.pool.release(self.buffer)


class HostStager:
    """Copies CUDA pages into the pool's buffers on a side stream (one per device, made on
    first use: nothing CUDA is created for CPU pages)."""

    def __init__(self, pool: StagingPool) -> None:
        self.pool = pool
        self._streams: dict[torch.device, Any] = {}
        self.misses = 0  # pages try_stage found no room for

    @property
    def streams(self) -> int:
        """Side streams made so far."""
        return len(self._streams)

    def stage(self, pages: torch.Tensor, timeout_s: float = 0.0) -> StagedPages:
        """Start moving ``pages`` to the host; CPU pages come back as they are (no copy).

        On CUDA, call this on the thread that computed ``pages``, right after the kernels
        that wrote them were queued: the copy waits for them on the GPU, not here. Raises
        :class:`StagingExhaustedError` when no buffer frees up within ``timeout_s``."""
        if pages.device.type != "cuda":
            return StagedPages(pages)
        buffer = self.pool.acquire(pages.shape, pages.dtype, timeout_s)
        try:
            compute = torch.cuda.current_stream(pages.device)
            ready = torch.cuda.Event()
            ready.record(compute)
            side = self._side_stream(pages.device)
            side.wait_event(ready)
            with torch.cuda.stream(side):
                buffer.tensor.copy_(pages, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            pages.record_stream(side)  # the allocator keeps ``pages`` until the copy is done
        except BaseException:
            self.pool.release(buffer)
            raise
        return StagedPages(buffer.tensor, buffer, done, self.pool)

    def try_stage(self, pages: torch.Tensor) -> StagedPages | None:
        """:meth:`stage` for CUDA pages, without waiting; None for pages elsewhere (nothing
        to stage) or when the pool has no room now (counted in ``misses``): the caller then
        sends ``pages`` as they are (a socket backend copies them with ``.cpu()``)."""
        if pages.device.type != "cuda":
            return None
        try:
            return self.stage(pages)
        except StagingExhaustedError:
            self.misses += 1
            return None

    def _side_stream(self, device: torch.device) -> Any:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream


def stager_for(backend: Backend, max_bytes: int) -> HostStager | None:
    """What a sender on ``backend`` stages CUDA pages with (``max_bytes`` of buffers at most):
    a stager on the stream backend, whose ``sendmsg`` has copied a payload when it returns, so
    its buffer may be reused at once; None elsewhere: ZeroMQ's zero-copy send may still read a
    payload after it returns (its pages stay on fresh ``.cpu()`` memory), nccl sends the CUDA
    tensor itself and gloo's pages are on the CPU already. Allocates nothing yet."""
    return HostStager(StagingPool(max_bytes)) if backend is Backend.STREAM else None
