"""A fault-injecting TCP proxy for chaos tests: one listening port forwarding to one upstream,
served by an asyncio loop in a background thread of the test process, with faults set at run
time. This kernel has no netem qdisc and no iptables, so latency, loss and partitions between
the tiers come from putting one of these between them (a worker's gRPC address, or a decode
worker's advertised KV endpoint).

The faults, and the model of TCP each follows (the endpoints only ever see TCP, which never
loses or reorders bytes, so every fault shows as *time*):

* ``latency_s``: one-way delay added to every chunk in both directions, so the round trip
  grows by twice it. Order is preserved: a chunk never leaves before the one read before it.
* ``loss``: probability that a chunk ("segment": one read of at most :data:`CHUNK_BYTES`,
  loopback's MTU) is lost. A lost segment is retransmitted after the retransmission timeout,
  so it and everything behind it in that direction are held for ``rto_s`` (default 200 ms,
  Linux's minimum RTO); the retransmission is lost with the same probability, and each
  consecutive loss doubles the timeout (200, 400, 800 ms ...: a held chunk waits their sum).
  This is the optimistic floor: Linux's RTO is ``srtt + max(4 * rttvar, 200 ms)``, so on a
  link with 200 ms of one-way latency a real stall is longer. Each direction of each connection
  draws from its own RNG, seeded from ``seed``, the connection's number and the direction, so
  the n-th chunk of a direction meets the same fate on every run.
* :meth:`FaultProxy.blackhole`: a partition as TCP sees it. Nothing is forwarded in either
  direction, connections stay open, bytes already sent wait (bounded by :data:`QUEUE_CHUNKS`
  per direction, then the sender is flow-controlled, as by a full window); a connection
  accepted meanwhile reaches upstream only after the heal. ``after_bytes`` arms it to start
  once that many more bytes went toward upstream (the rest of that chunk held: mid-message).
  :meth:`FaultProxy.heal` releases what waits at once (a real TCP resumes at its next
  retransmission, up to about as long again after a long partition).
* :meth:`FaultProxy.reset_all`: every proxied connection closed abruptly (RST, held bytes
  dropped), as a middlebox losing its state does; the listening port stays.

Invariants: every connection's state lives on the proxy's loop thread (the public methods hand
work to it and wait); ``latency_s`` and ``loss`` are plain floats the loop reads at each chunk
(set them from any thread); :meth:`FaultProxy.stop` closes every connection and the port and
joins the thread. :meth:`FaultProxy.stats` counts what went through, so a test can assert that
traffic took the proxied path.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Self, TypeVar

CHUNK_BYTES = 64 << 10
"""Largest read forwarded as one chunk (one loopback segment)."""
QUEUE_CHUNKS = 64
"""Chunks held per direction before the proxy stops reading that side (its receive window)."""
MAX_LOSSES = 12
"""Consecutive losses of one chunk at most (200 ms x (2^12 - 1) is nearly 14 minutes)."""

T = TypeVar("T")


@dataclass
class ProxyStats:
    """What went through the proxy since it started."""

    connections: int = 0
    """Connections accepted."""
    open_connections: int = 0
    bytes_up: int = 0
    """Bytes delivered toward upstream."""
    bytes_down: int = 0
    """Bytes delivered back toward the connecting side."""
    losses: int = 0
    """Chunk losses drawn (each one a retransmission timeout)."""
    stall_s: float = 0.0
    """Retransmission timeouts summed over every chunk."""
    resets: int = 0
    """Connections closed by :meth:`FaultProxy.reset_all`."""


class _Pipe:
    """One direction of one connection: read, delay, forward in order."""

    def __init__(
        self,
        proxy: FaultProxy,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        seed: str,
        upward: bool,
    ) -> None:
        self.proxy = proxy
        self.reader = reader
        self.writer = writer
        self.rng = random.Random(seed)
        self.upward = upward
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
        self.last_due = 0.0

    async def read(self) -> None:
        """Take chunks off the socket, stamp each with the time it may leave."""
        loop = asyncio.get_running_loop()
        while data := await self.reader.read(CHUNK_BYTES):
            stall = self.proxy.draw_stall(self.rng)
            due = loop.time() + max(0.0, self.proxy.latency_s) + stall
            self.last_due = due = max(due, self.last_due)
            await self.queue.put((due, data))
        await self.queue.put((self.last_due, b""))  # end of stream, in order

    async def write(self) -> None:
        """Forward chunks once due and while the link is up; pass the half-close on."""
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            while data:
                await self.proxy.link_up.wait()
                sent = self.proxy.allowance(len(data)) if self.upward else len(data)
                if sent:
                    self.writer.write(data[:sent])
                    await self.writer.drain()
                    self.proxy.delivered(sent, self.upward)
                data = data[sent:]


class _Link:
    """One proxied connection: the accepted socket and its upstream twin."""

    def __init__(self, number: int, client: asyncio.StreamWriter) -> None:
        self.number = number
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[object]] = []

    def abort(self) -> None:
        """Close both sockets with an RST (SO_LINGER 0), dropping what is held, and cancel
        the link's tasks."""
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """Forwards ``listen_host:port`` (0: a free one, see :attr:`port`) to ``upstream``
    (``host:port``). Use as a context manager, or :meth:`start` then :meth:`stop`."""

    def __init__(
        self,
        upstream: str,
        *,
        listen_host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        rto_s: float = 0.2,
    ) -> None:
        self.upstream = upstream
        self.listen_host = listen_host
        self.port = port
        self.seed = seed
        self.rto_s = rto_s
        self.latency_s = 0.0
        """One-way delay added to every chunk (seconds)."""
        self.loss = 0.0
        """Probability per chunk of a loss (a retransmission stall; see the module docstring)."""
        self._stats = ProxyStats()
        self._links: dict[int, _Link] = {}
        self._callbacks: set[asyncio.Task[object]] = set()  # _accept's, until they end
        self._budget: int | None = None  # bytes toward upstream left before a blackhole
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy")
        self._server: asyncio.Server | None = None
        self.link_up = asyncio.Event()  # set: forwarding; clear: blackholed (loop thread only)

    # -- the test's side (any thread) -------------------------------------------------------

    @property
    def upstream(self) -> str:
        """``host:port`` forwarded to; a new value applies to connections accepted after."""
        return f"{self.upstream_host}:{self.upstream_port}"

    @upstream.setter
    def upstream(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self.upstream_host, self.upstream_port = host.strip("[]"), int(port)

    @property
    def address(self) -> str:
        """``host:port`` to give the proxied side instead of the upstream's."""
        return f"{self.listen_host}:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        self._run(self._serve)
        return self

    def stop(self) -> None:
        """Close the port and every connection, end the loop and join its thread."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(TimeoutError):
            self._run(self._close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def blackhole(self, after_bytes: int = 0) -> None:
        """Stop forwarding in both directions, connections left open: now, or once
        ``after_bytes`` more bytes went toward upstream (across connections)."""

        def cut() -> None:
            if after_bytes > 0:
                self._budget = after_bytes
            else:
                self._budget = None
                self.link_up.clear()

        self._run_sync(cut)

    def heal(self) -> None:
        """Forward again (what waited goes at once); disarms a pending ``after_bytes``."""

        def mend() -> None:
            self._budget = None
            self.link_up.set()

        self._run_sync(mend)

    @property
    def blackholed(self) -> bool:
        return self._run_sync(lambda: not self.link_up.is_set())

    def clear(self) -> None:
        """No fault: no latency, no loss, forwarding."""
        self.latency_s = self.loss = 0.0
        self.heal()

    def reset_all(self) -> int:
        """Close every proxied connection abruptly (RST); returns how many."""

        def reset() -> int:
            links = list(self._links.values())
            for link in links:
                link.abort()
            self._links.clear()
            self._stats.resets += len(links)
            self._stats.open_connections = 0
            return len(links)

        return self._run_sync(reset)

    def stats(self) -> ProxyStats:
        """A snapshot of the counters."""
        return self._run_sync(lambda: replace(self._stats))

    # -- the loop thread --------------------------------------------------------------------

    def draw_stall(self, rng: random.Random) -> float:
        """Retransmission timeouts a chunk waits: one per consecutive loss, doubling."""
        stall, rto, losses = 0.0, self.rto_s, 0
        while losses < MAX_LOSSES and self.loss > 0 and rng.random() < self.loss:
            stall, rto, losses = stall + rto, rto * 2, losses + 1
        self._stats.losses += losses
        self._stats.stall_s += stall
        return stall

    def allowance(self, nbytes: int) -> int:
        """How much of ``nbytes`` toward upstream may go before an armed blackhole starts."""
        if self._budget is None:
            return nbytes
        sent = min(nbytes, self._budget)
        self._budget -= sent
        if self._budget == 0:
            self._budget = None
            self.link_up.clear()
        return sent

    def delivered(self, nbytes: int, upward: bool) -> None:
        if upward:
            self._stats.bytes_up += nbytes
        else:
            self._stats.bytes_down += nbytes

    async def _serve(self) -> None:
        self.link_up.set()
        self._server = await asyncio.start_server(
            self._accept, self.listen_host, self.port, limit=CHUNK_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio's callback for a new connection: relays it in a task of its own, which
        :meth:`_Link.abort` may cancel (cancelling this callback's task upsets asyncio)."""
        number = self._stats.connections
        self._stats.connections += 1
        self._stats.open_connections += 1
        link = _Link(number, writer)
        self._links[number] = link
        callback = asyncio.current_task()
        assert callback is not None
        self._callbacks.add(callback)
        relay = asyncio.create_task(self._relay(link, reader, writer))
        link.tasks.append(relay)
        clean = False
        try:
            await relay
            clean = True
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # reset, refused, or cut by reset_all / stop: the other side is reset too
        finally:
            if self._links.pop(number, None) is not None:
                self._stats.open_connections -= 1
            if clean:  # both directions ended with a half-close: close normally
                for w in (writer, link.upstream):
                    if w is not None:
                        w.close()
            else:
                link.abort()
            self._callbacks.discard(callback)

    async def _relay(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self.link_up.wait()  # a partition: the SYN would not get through either
        up_reader, up_writer = await asyncio.open_connection(
            self.upstream_host, self.upstream_port, limit=CHUNK_BYTES
        )
        link.upstream = up_writer
        number = link.number
        pipes = (
            _Pipe(self, reader, up_writer, f"{self.seed}-{number}-up", upward=True),
            _Pipe(self, up_reader, writer, f"{self.seed}-{number}-down", upward=False),
        )
        tasks = [asyncio.create_task(f()) for p in pipes for f in (p.read, p.write)]
        link.tasks.extend(tasks)
        await asyncio.gather(*tasks)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks: list[asyncio.Task[object]] = [t for x in self._links.values() for t in x.tasks]
        for link in list(self._links.values()):
            link.abort()
        self._links.clear()
        self._stats.open_connections = 0
        tasks += self._callbacks
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2)
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 2)

    def _run(self, coro: Callable[[], Awaitable[T]], timeout_s: float = 10.0) -> T:
        async def call() -> T:
            return await coro()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout_s)

    def _run_sync(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return self._run(call)
