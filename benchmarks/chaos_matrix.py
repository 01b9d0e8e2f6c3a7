"""The fault x phase matrix: SIGKILL and SIGSTOP of each tier at each phase of a request.

    .venv/bin/python -m benchmarks.chaos_matrix [--cells kill:decode:mid-decode,...]
        [--requests 8] [--supervised] [--model PATH|default] [--json chaos_matrix.json]
        [--prefill 2 --decode 2] [--prompt-len 900] [--max-tokens 96] [--deadline 20]

Run it from the repository root (``-m``). Starts a real cluster (``pdserve up`` on loopback:
2 prefill + 2 decode workers, ``--keep-going`` so a killed worker stays dead while the rest
serve; ``--supervised``: plain ``up``, which restarts it) on a tiny random llama (``--model``:
a model folder, or ``default`` for the default model) with settings that stretch each phase:
900-token prompts computed 16 tokens a step (``--max-batched-tokens 16``), at most 2 sequences
a batch on every worker (``--max-num-seqs 2``, a queue on both tiers), prefix caching off (so
every cell recomputes the same prompts). Each cell runs ``--requests`` greedy ``ignore_eos``
requests, polls every worker's ``GetStatus``, the client's streams and the gateway's
``request_routed`` log lines (which worker each request is on) until a worker of the cell's
tier is in the cell's phase, and then signals it:

- prefill ``queued`` (a prompt waiting on it), ``mid-prefill`` (a prompt mid-compute, none
  queued), ``mid-transfer`` (a computed prompt whose pages are not yet acknowledged);
- decode ``mid-transfer`` (a request on it with no token yet, its prompt computing on its
  prefill worker: pages arriving), ``queued`` (a sequence whose pages are in, waiting for a
  batch slot), ``first-token-sent`` (a request on it whose client has the first token only,
  its sequence not yet decoding), ``mid-decode`` (a request on it with >= 4 tokens out);
- the gateway ``mid-decode`` (half the requests >= 4 tokens out). Its SIGKILL ends the
  cluster by design (``up`` stops with status 1): run last, recorded as such.

A stopped process gets SIGCONT once every request ended. A request is *identical* (its tokens
equal an undisturbed run's), *clean* (it ended with UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED, CANCELLED or ABORTED after a prefix of the right tokens) or *lost* (wrong,
missing or duplicated tokens, another status such as UNKNOWN or INTERNAL, or still open
``HANG_SLACK_S`` past its deadline). *hit* counts the requests that needed the victim at the
fault (not done, and on it: its decode worker, or its prefill worker before the second token).
Leaked blocks: KV blocks still held (and work running, waiting or pending) ``--idle-timeout``
seconds after the requests ended, on every live worker (the stopped one after its SIGCONT).
Serving again: from the fault until a fresh request (probes sent every 0.2 s from the fault
on) succeeds. Before the next cell the fleet is restored: a killed worker is started again on
its address (``--supervised``: ``up`` does it) and the gateway must route to it again; when
that fails, a fresh cluster is started (noted in the JSON). ``up --keep-going`` ends the
cluster when every decode worker *it* started is dead, so a decode SIGKILL spares the last of
them when a copy started here can be the victim. A cell whose phase is not seen in
``--tries`` runs is reported as not reached.

Prints a markdown table and a summary; ``--json`` writes every request's outcome and, for lost
ones, the cluster log lines of its request id. Exits 1 if a request is lost or a block leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from core.tls import secure_channel
from engine.config import DEFAULT_MODEL, ModelConfig
from engine.model_files import default_cache_dir, resolve_model_path
from pdserve.client import NO_RETRY, AsyncClient
from pdserve.local_cluster import Cluster, start_cluster
from protos.pdserve.v1 import worker_pb2, worker_pb2_grpc

FAULTS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
PHASES = {
    "prefill": ("queued", "mid-prefill", "mid-transfer"),
    "decode": ("queued", "mid-transfer", "first-token-sent", "mid-decode"),
    "gateway": ("mid-decode",),
}
CLEAN_CODES = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED"}
)
HANG_SLACK_S = 10.0  # a call still open this long past its deadline hangs
STALE_AFTER_S = 1.5  # the gateway's default --stale-after
PROBE_EVERY_S = 0.2
PROBE_TIMEOUT_S = 5.0
RESTORE_TIMEOUT_S = 120.0
LATER_S = 70.0  # a pool not idle is looked at again for this long (the KV lease is 60 s)
GATEWAY_KILL = "kill:gateway:mid-decode"  # ends the cluster by design: always the last cell
SUPERVISED_FLAGS = ("--restart-delay", "0.5", "--restart-limit", "100", "--restart-window", "60")


class Cell(NamedTuple):
    fault: str
    tier: str
    phase: str

    @property
    def name(self) -> str:
        return f"{self.fault}:{self.tier}:{self.phase}"

    @classmethod
    def parse(cls, text: str) -> Cell:
        """``fault:tier:phase``, e.g. ``kill:decode:mid-decode``."""
        parts = text.strip().split(":")
        if len(parts) != 3 or parts[0] not in FAULTS or parts[2] not in PHASES.get(parts[1], ()):
            raise argparse.ArgumentTypeError(f"no such cell {text!r}")
        return cls(*parts)


def parse_cells(text: str) -> list[Cell]:
    """Comma-separated cells, the gateway's SIGKILL moved last (it ends the cluster)."""
    cells = [Cell.parse(c) for c in text.split(",") if c.strip()]
    return sorted(cells, key=lambda c: c.name == GATEWAY_KILL)


ALL_CELLS = [
    *(Cell(f, t, p) for t in ("prefill", "decode") for f in FAULTS for p in PHASES[t]),
    Cell("stop", "gateway", "mid-decode"),
    Cell("kill", "gateway", "mid-decode"),  # last: it ends the cluster
]


@dataclass(frozen=True)
class Options:
    requests: int = 8
    prompt_len: int = 900
    max_tokens: int = 96
    deadline_s: float = 20.0
    """Each request's deadline (a stopped gateway's requests run into it)."""
    tries: int = 3
    """Runs of a cell before its phase counts as not reached."""
    idle_timeout_s: float = 20.0
    serving_timeout_s: float = 30.0
    supervised: bool = False
    prefill: int = 2
    decode: int = 2
    seed: int = 0


@dataclass
class Request:
    index: int
    request_id: str
    tokens: list[int] = field(default_factory=list)
    code: str | None = None
    details: str = ""
    hung: bool = False
    done_at: float = 0.0


class GatewayLog:
    """Follows the cluster's log: each request's latest route, the gateway's view of each
    worker (its ``worker_<state>`` lines), and every line naming a request id (evidence)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self.routes: dict[str, tuple[str, str | None]] = {}
        self.states: dict[str, tuple[float, str]] = {}
        self.by_request: dict[str, list[dict[str, Any]]] = {}

    def poll(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].decode(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            event, rid = str(record.get("event", "")), record.get("request_id")
            if isinstance(rid, str):
                self.by_request.setdefault(rid, []).append(record)
            if event == "request_routed" and isinstance(rid, str):
                self.routes[rid] = (str(record["decode"]), record.get("prefill"))
            elif event.startswith("worker_") and "previous" in record and "address" in record:
                at = datetime.fromisoformat(str(record["timestamp"])).timestamp()
                self.states[str(record["address"])] = (at, event.removeprefix("worker_"))

    def serving(self, address: str, after: float = 0.0) -> bool:
        """The gateway's last word on ``address`` is SERVING (said after ``after``, wall time,
        when given), or it never said otherwise."""
        self.poll()
        at, state = self.states.get(address, (0.0, "serving"))
        return state == "serving" and (at > after or not after)


class Fleet:
    """The cluster under test: each child's pid (a copy this script started replaces a killed
    worker's under ``--keep-going``), asyncio status stubs, the gateway's log."""

    def __init__(self, model: str, log_dir: Path, opts: Options) -> None:
        self.model, self.log_dir, self.opts = model, log_dir, opts
        self.key = log_dir / "kv.key"  # spawned copies must share the fleet's KV secret
        self.key.write_text(secrets.token_hex(16))
        self.cluster: Cluster | None = None
        self.restarts = 0

    def start(self) -> None:
        supervision = SUPERVISED_FLAGS if self.opts.supervised else ("--keep-going",)
        self.cluster = start_cluster(
            self.model,
            prefill=self.opts.prefill,
            decode=self.opts.decode,
            log_dir=self.log_dir,
            extra=(
                *supervision,
                "--kv-key-file",
                str(self.key),
                "--no-prefix-caching",
                "--max-num-seqs",
                "2",
                "--max-batched-tokens",
                "16",
            ),
        )
        children = self.cluster.children()
        self.pids = {n: c.pid for n, c in children.items()}
        self.owned = set(self.pids)  # children of up (not copies this script started)
        self.addresses = {n: c.address for n, c in children.items()}
        self.argv = {n: c.argv for n, c in children.items()}
        self.log = GatewayLog(self.cluster.log_path)
        self._stubs: dict[str, Any] = {}

    @property
    def c(self) -> Cluster:
        assert self.cluster is not None
        return self.cluster

    def victims(self, cell: Cell) -> list[str]:
        """Who ``cell`` may signal. ``up --keep-going`` ends the cluster once every decode
        worker it started is dead (copies started here are not its children): never kill
        the last of them while a copy can be the victim instead."""
        if cell.tier == "gateway":
            return ["gateway"]
        names = self.workers(cell.tier)
        owned = [n for n in names if n in self.owned]
        if cell.fault == "kill" and cell.tier == "decode" and len(owned) == 1:
            return [n for n in names if n not in owned] or names
        return names

    def workers(self, tier: str | None = None) -> list[str]:
        return sorted(
            n for n in self.pids if n != "gateway" and (tier is None or n.startswith(tier))
        )

    async def status(self, name: str) -> worker_pb2.WorkerStatus | None:
        """``name``'s status, or None when it does not answer within 0.5 s."""
        if name not in self._stubs:
            channel = secure_channel(self.addresses[name], None)
            prefill = name.startswith("prefill")
            stub = (worker_pb2_grpc.PrefillStub if prefill else worker_pb2_grpc.DecodeStub)(channel)
            self._stubs[name] = (channel, stub)
        try:
            reply: worker_pb2.WorkerStatus = await self._stubs[name][1].GetStatus(
                worker_pb2.StatusRequest(), timeout=0.5
            )
        except grpc.RpcError:
            return None
        return reply

    async def statuses(self, names: Sequence[str]) -> dict[str, worker_pb2.WorkerStatus | None]:
        replies = await asyncio.gather(*[self.status(n) for n in names])
        return dict(zip(names, replies, strict=True))

    async def forget_channel(self, name: str) -> None:
        """A fresh channel next time (one to a dead address backs off for up to minutes)."""
        channel, _ = self._stubs.pop(name, (None, None))
        if channel is not None:
            await channel.close()

    async def respawn(self, name: str, killed_at: float) -> None:
        """Start a copy of worker ``name``, killed at ``killed_at`` (wall time), on its address
        (``--supervised``: wait for ``up`` to); done once it serves and the gateway took it
        back (said it is SERVING after the kill; after the copy's start here)."""
        since = killed_at if self.opts.supervised else time.time()
        await self.forget_channel(name)
        if self.opts.supervised:
            old = self.pids[name]
            child = await asyncio.to_thread(
                self.c.wait_child,
                name,
                lambda ch: ch.pid not in (0, old) and ch.state == "serving",
                RESTORE_TIMEOUT_S,
            )
            self.pids[name] = child.pid
        else:
            self.restarts += 1
            proc = self.c.spawn(self.argv[name], f"{name}-copy{self.restarts}")
            self.pids[name] = proc.pid
            self.owned.discard(name)
            await asyncio.to_thread(self.c.wait_serving, self.addresses[name], RESTORE_TIMEOUT_S)
        await self.gateway_takes_back(name, since)

    async def gateway_takes_back(self, name: str, since: float = 0.0) -> None:
        deadline = time.monotonic() + RESTORE_TIMEOUT_S
        while not self.log.serving(self.addresses[name], since):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the gateway never took {name} back")
            await asyncio.sleep(0.1)

    async def pools(self, names: Sequence[str], timeout_s: float) -> Pools:
        """Each worker's held blocks and work once all are idle, or at ``timeout_s``."""
        start = time.monotonic()
        first = None
        while True:
            found = await self.statuses(names)
            report = {n: _pool(s) for n, s in found.items()}
            first = first or report
            waited = time.monotonic() - start
            if all(not any(p.values()) for p in report.values()) or waited > timeout_s:
                return Pools(report, round(waited, 2), first)
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None


class Pools(NamedTuple):
    workers: dict[str, dict[str, int]]
    """Per worker: held blocks, running, waiting, pending transfers, broken pool (all 0: idle)."""
    waited_s: float
    first: dict[str, dict[str, int]]
    """The first look (right after the requests ended)."""

    @property
    def not_idle(self) -> list[str]:
        return sorted(n for n, p in self.workers.items() if any(p.values()))


def _pool(s: worker_pb2.WorkerStatus | None) -> dict[str, int]:
    if s is None:
        return {"unreachable": 1}
    return {
        "held_blocks": s.total_blocks - s.free_blocks,
        "running": s.running,
        "waiting": s.waiting,
        "pending_transfers": s.pending_transfers,
        "pool_broken": int(not s.pool_ok),
    }


def _in_phase(
    cell: Cell,
    victim: str,
    found: dict[str, worker_pb2.WorkerStatus | None],
    on_victim: list[Request],
    fleet: Fleet,
    requests: list[Request],
) -> bool:
    if cell.tier == "gateway":
        return sum(len(r.tokens) >= 4 for r in requests) >= max(1, len(requests) // 2)
    me = found[victim]
    if me is None:
        return False
    if cell.tier == "prefill":
        return {
            "queued": me.waiting >= 1,
            "mid-prefill": me.running >= 1 and me.waiting == 0,
            "mid-transfer": me.pending_transfers > me.running + me.waiting,
        }[cell.phase]
    by_address = {fleet.addresses[n]: s for n, s in found.items()}
    if cell.phase == "mid-transfer":
        computing = [by_address.get(fleet.log.routes[r.request_id][1] or "") for r in on_victim]
        return me.awaiting_kv >= 1 and any(
            not r.tokens and s is not None and s.running >= 1
            for r, s in zip(on_victim, computing, strict=True)
        )
    if cell.phase == "queued":
        return me.waiting >= 1
    if cell.phase == "first-token-sent":
        return me.waiting + me.awaiting_kv >= 1 and any(len(r.tokens) == 1 for r in on_victim)
    return me.running >= 1 and any(len(r.tokens) >= 4 for r in on_victim)


class Fault(NamedTuple):
    victim: str
    at: float  # monotonic
    wall: float
    hit: list[int]  # requests that depended on the victim at the fault
    seen: dict[str, dict[str, int]]  # the last poll before the fault
    continued: list[float]  # when a stopped victim got SIGCONT (monotonic)


def _depends_on(fleet: Fleet, victim: str, r: Request) -> bool:
    """Whether request ``r`` (not done) needs ``victim`` now: the gateway always; its decode
    worker; its prefill worker until the decode worker streams (pages in by then)."""
    if victim == "gateway":
        return True
    decode, prefill = fleet.log.routes.get(r.request_id, ("", None))
    address = fleet.addresses[victim]
    return address == decode or (address == prefill and len(r.tokens) <= 1)


async def _inject_when_in_phase(
    fleet: Fleet, cell: Cell, requests: list[Request], tasks: list[asyncio.Task[None]]
) -> Fault | None:
    candidates = fleet.victims(cell)
    while not all(t.done() for t in tasks):
        fleet.log.poll()
        found = await fleet.statuses(fleet.workers())
        for victim in candidates:
            live = [r for r in requests if not r.done_at]
            on_victim = [r for r in live if _depends_on(fleet, victim, r)]
            if _in_phase(cell, victim, found, on_victim, fleet, requests):
                os.kill(fleet.pids[victim], FAULTS[cell.fault])
                seen = {n: _status_dict(s) for n, s in found.items()}
                hit = [r.index for r in on_victim]
                return Fault(victim, time.monotonic(), time.time(), hit, seen, [])
        await asyncio.sleep(0.002)
    return None


def _status_dict(s: worker_pb2.WorkerStatus | None) -> dict[str, int]:
    names = ("running", "waiting", "awaiting_kv", "pending_transfers", "in_flight")
    return {} if s is None else {n: int(getattr(s, n)) for n in names}


async def _stream(client: AsyncClient, prompt: list[int], req: Request, opts: Options) -> None:
    async def read() -> None:
        async for chunk in client.generate(
            prompt_token_ids=prompt,
            max_tokens=opts.max_tokens,
            temperature=0.0,
            ignore_eos=True,
            timeout=opts.deadline_s,
            request_id=req.request_id,
        ):
            req.tokens.extend(chunk.token_ids)

    try:
        await asyncio.wait_for(read(), opts.deadline_s + HANG_SLACK_S)
    except grpc.aio.AioRpcError as exc:
        req.code, req.details = exc.code().name, exc.details() or ""
    except TimeoutError:
        req.hung = True
    req.done_at = time.monotonic()


class Probe:
    """Fresh short requests every ``PROBE_EVERY_S`` from the fault on, until one succeeds or
    ``deadline`` (monotonic; the caller moves it on a SIGCONT) passes."""

    def __init__(self, gateway: str, since: float, timeout_s: float) -> None:
        self.gateway, self.since = gateway, since
        self.deadline = since + timeout_s
        self.succeeded_at: float | None = None

    async def run(self) -> float | None:
        rng = random.Random(self.since)
        async with AsyncClient(self.gateway, retry=NO_RETRY) as client:
            tasks: list[asyncio.Task[None]] = []
            while self.succeeded_at is None and time.monotonic() < self.deadline:
                prompt = [rng.randrange(3, 500) for _ in range(24)]
                tasks.append(asyncio.create_task(self._one(client, prompt)))
                await asyncio.sleep(PROBE_EVERY_S)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return None if self.succeeded_at is None else self.succeeded_at - self.since

    async def _one(self, client: AsyncClient, prompt: list[int]) -> None:
        with contextlib.suppress(grpc.RpcError):
            tokens = 0
            async for chunk in client.generate(
                prompt_token_ids=prompt, max_tokens=4, ignore_eos=True, timeout=PROBE_TIMEOUT_S
            ):
                tokens += len(chunk.token_ids)
            if tokens == 4 and self.succeeded_at is None:
                self.succeeded_at = time.monotonic()


def prompts_for(opts: Options) -> list[list[int]]:
    rng = random.Random(opts.seed)
    return [[rng.randrange(3, 500) for _ in range(opts.prompt_len)] for _ in range(opts.requests)]


async def run_requests(
    fleet: Fleet, prompts: list[list[int]], tag: str, cell: Cell | None = None
) -> tuple[list[Request], Fault | None, Probe | None]:
    """``prompts`` through the gateway; with ``cell``, its fault injected in its phase (a
    stopped victim gets SIGCONT after every request ended)."""
    reqs = [Request(i, f"{tag}-r{i}-{secrets.token_hex(3)}") for i in range(len(prompts))]
    fault, probe, probing = None, None, None
    try:
        async with AsyncClient(fleet.c.gateway, retry=NO_RETRY) as client:
            tasks = [
                asyncio.create_task(_stream(client, p, r, fleet.opts))
                for p, r in zip(prompts, reqs, strict=True)
            ]
            if cell is not None:
                fault = await _inject_when_in_phase(fleet, cell, reqs, tasks)
            if fault is not None and cell is not None and cell.name != GATEWAY_KILL:
                probe = Probe(fleet.c.gateway, fault.at, fleet.opts.serving_timeout_s)
                probing = asyncio.create_task(probe.run())
            await asyncio.gather(*tasks)
    finally:  # never leave a process stopped
        if fault is not None and cell is not None and cell.fault == "stop":
            os.kill(fleet.pids[fault.victim], signal.SIGCONT)
            fault.continued.append(time.monotonic())
            if probe is not None:
                probe.deadline = time.monotonic() + fleet.opts.serving_timeout_s
    if probing is not None:
        await probing
    return reqs, fault, probe


def classify(req: Request, want: list[int]) -> tuple[str, str]:
    """``(identical|clean|lost, why)``."""
    if req.hung:
        return "lost", f"still open {HANG_SLACK_S:g} s past its deadline"
    if req.code is None:
        if req.tokens == want:
            return "identical", ""
        return "lost", _difference(req.tokens, want)
    if req.code not in CLEAN_CODES:
        return "lost", f"{req.code}: {req.details}"
    if req.tokens != want[: len(req.tokens)]:
        return "lost", f"{req.code} after wrong tokens ({_difference(req.tokens, want)})"
    return "clean", req.code


def _serving_again(probe: Probe | None, fault: Fault) -> float | None:
    if probe is None or probe.succeeded_at is None:
        return None
    return round(probe.succeeded_at - fault.at, 3)


def _difference(got: list[int], want: list[int]) -> str:
    first = next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
        min(len(got), len(want)),
    )
    return f"{len(got)} tokens, want {len(want)}; first difference at {first}"


async def run_cell(
    fleet: Fleet, cell: Cell, prompts: list[list[int]], want: list[list[int]], index: int
) -> dict[str, Any]:
    """One cell: up to ``tries`` runs until its phase is seen, the outcome of each request,
    the pools once idle, and the fleet restored for the next cell."""
    opts = fleet.opts
    reqs: list[Request] = []
    fault: Fault | None = None
    probe: Probe | None = None
    tries = 0
    undisturbed_lost: list[str] = []
    while fault is None and tries < opts.tries:
        tries += 1
        await asyncio.sleep(1.0)  # fresh load reports: requests spread over every worker
        reqs, fault, probe = await run_requests(fleet, prompts, f"c{index}t{tries}", cell)
        if fault is None:
            undisturbed_lost += [
                r.request_id
                for r, w in zip(reqs, want, strict=True)
                if classify(r, w)[0] != "identical"
            ]
    row: dict[str, Any] = {
        "cell": cell.name,
        **cell._asdict(),
        "tries": tries,
        "reached": fault is not None,
    }
    if undisturbed_lost:
        row["undisturbed_lost"] = undisturbed_lost
    if fault is None:
        return row
    outcomes = [classify(r, w) for r, w in zip(reqs, want, strict=True)]
    fleet.log.poll()
    row.update(
        victim=fault.victim,
        seen_at_fault=fault.seen,
        hit=len(fault.hit),
        fault_at=datetime.fromtimestamp(fault.wall, UTC).isoformat(),
        fault_wall=fault.wall,
        counts=dict(Counter(o for o, _ in outcomes)),
        codes=dict(Counter(why for o, why in outcomes if o == "clean")),
        serving_again_s=_serving_again(probe, fault),
        sigcont_after_s=round(fault.continued[0] - fault.at, 3) if fault.continued else None,
        requests=[
            {
                "index": r.index,
                "request_id": r.request_id,
                "outcome": o,
                "why": why,
                "tokens": len(r.tokens),
                "hit": r.index in fault.hit,
                "ended_after_fault_s": round(r.done_at - fault.at, 3),
                **(
                    {"log": fleet.log.by_request.get(r.request_id, [])[-20:]} if o == "lost" else {}
                ),
            }
            for r, (o, why) in zip(reqs, outcomes, strict=True)
        ],
    )
    if cell.name == GATEWAY_KILL:
        code = await asyncio.to_thread(fleet.c.proc.wait, 60)
        row.update(pools={}, leaked_blocks=0, by_design=f"the cluster ends (up exited {code})")
        fleet.stop()
        return row
    dead = {fault.victim} if cell.fault == "kill" else set()
    pools = await fleet.pools([n for n in fleet.workers() if n not in dead], opts.idle_timeout_s)
    held = sum(p.get("held_blocks", 0) for p in pools.workers.values())
    row.update(pools=pools.workers, idle_after_s=pools.waited_s, leaked_blocks=held)
    if pools.waited_s > 1.0:
        row["pools_when_requests_ended"] = pools.first
    row["not_idle"] = pools.not_idle
    if pools.not_idle:  # a bounded hold (a lease running out) or a leak?
        later = await fleet.pools(pools.not_idle, LATER_S)
        row["later"] = {"pools": later.workers, "after_s": later.waited_s + pools.waited_s}
    return row


async def restore(fleet: Fleet, row: dict[str, Any]) -> None:
    """Back to every worker serving, idle and routed to (a fresh cluster if that fails)."""
    try:
        if fleet.cluster is None or fleet.c.proc.poll() is not None:
            raise RuntimeError("the cluster is gone")
        victim = row.get("victim")
        if row.get("fault") == "kill" and victim and victim != "gateway":
            await fleet.respawn(victim, row["fault_wall"])
        elif row.get("fault") == "stop" and victim:
            await asyncio.sleep(STALE_AFTER_S + 0.5)  # a late silence verdict, then its recovery
            for name in fleet.workers():
                await fleet.gateway_takes_back(name)
        pools = await fleet.pools(fleet.workers(), 20.0)
        if pools.not_idle:
            raise RuntimeError(f"pools not idle after the restore: {pools.workers}")
    except RuntimeError as exc:
        row.setdefault("notes", []).append(f"fleet restarted: {exc}")
        await asyncio.to_thread(fleet.stop)
        await asyncio.to_thread(fleet.start)


async def run_matrix(fleet: Fleet, cells: list[Cell]) -> dict[str, Any]:
    """Every cell on ``fleet`` (started); the report."""
    prompts = prompts_for(fleet.opts)
    want, _, _ = await run_requests(fleet, prompts, "reference")
    again, _, _ = await run_requests(fleet, prompts, "reference2")
    if any(r.code or r.hung for r in want) or [r.tokens for r in want] != [r.tokens for r in again]:
        raise RuntimeError(f"two undisturbed runs disagree or fail: {want} {again}")
    rows = []
    for i, cell in enumerate(cells):
        if fleet.cluster is None:
            await asyncio.to_thread(fleet.start)
        t0 = time.monotonic()
        row = await run_cell(fleet, cell, prompts, [r.tokens for r in want], i)
        if i + 1 < len(cells) and fleet.cluster is not None:
            await restore(fleet, row)
        row["seconds"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        print(f"{cell.name}: {summary_line(row)}", file=sys.stderr, flush=True)
    return {
        "options": asdict(fleet.opts),
        "cells": rows,
        "findings": findings(rows, fleet.opts),
    }


def findings(rows: list[dict[str, Any]], opts: Options) -> list[str]:
    """Lost requests, pools not idle, undisturbed runs that differ: each one a line."""
    out = []
    for row in rows:
        cell = row["cell"]
        for r in row.get("requests", []):
            if r["outcome"] == "lost":
                out.append(f"{cell}: {r['request_id']} lost ({row['victim']} hit): {r['why']}")
        for name, pool in row.get("pools", {}).items():
            if any(pool.values()):
                wait = f"{opts.idle_timeout_s:g} s"
                out.append(f"{cell}: {name} not idle {wait} after the requests ended: {pool}")
        out += [
            f"{cell}: undisturbed {rid} not identical" for rid in row.get("undisturbed_lost", [])
        ]
    return out


def summary_line(row: dict[str, Any]) -> str:
    if not row["reached"]:
        return f"phase not reached in {row['tries']} tries"
    counts = row["counts"]
    return (
        f"victim {row['victim']}, hit {row['hit']}, identical {counts.get('identical', 0)}, "
        f"clean {counts.get('clean', 0)}, lost {counts.get('lost', 0)}, "
        f"leaked {row['leaked_blocks']}, serving again {row['serving_again_s']}"
    )


def table(report: dict[str, Any]) -> str:
    lines = [
        "| fault | tier | phase | requests | hit | identical | clean status (codes) | lost "
        "| leaked blocks | serving again (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["cells"]:
        head = f"| {row['fault']} | {row['tier']} | {row['phase']} "
        if not row["reached"]:
            lines.append(head + f"| phase not reached in {row['tries']} tries | | | | | | |")
            continue
        counts, codes = row["counts"], row["codes"]
        clean = f"{counts.get('clean', 0)}" + (
            f" ({', '.join(f'{c} {n}' for c, n in sorted(codes.items()))})" if codes else ""
        )
        leaked = f"{row['leaked_blocks']}" + (
            f" ({', '.join(row['not_idle'])})" if row.get("not_idle") else ""
        )
        again, cont = row["serving_again_s"], row["sigcont_after_s"]
        if "by_design" in row:
            again_text = "never (by design)"
        elif again is None:
            again_text = "not within the timeout"
        else:
            after = f" ({again - cont:.2f} after SIGCONT)" if cont and again > cont else ""
            again_text = f"{again:.2f}{after}"
        lines.append(
            head
            + f"| {len(row['requests'])} | {row['hit']} | {counts.get('identical', 0)} | {clean} "
            f"| {counts.get('lost', 0)} | {leaked} | {again_text} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cells",
        type=parse_cells,
        default=ALL_CELLS,
        help="comma-separated fault:tier:phase (default: all)",
    )
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--supervised", action="store_true", help="plain up: dead workers restart")
    parser.add_argument(
        "--model", default=None, help="model folder, or 'default' (default: tiny llama)"
    )
    parser.add_argument("--deadline", type=float, default=20.0, help="seconds per request")
    parser.add_argument("--tries", type=int, default=3, help="runs to catch a cell's phase")
    parser.add_argument("--idle-timeout", type=float, default=20.0, help="seconds for pools")
    parser.add_argument("--prefill", type=int, default=2, help="prefill workers")
    parser.add_argument("--decode", type=int, default=2, help="decode workers")
    parser.add_argument("--prompt-len", type=int, default=900)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args(argv)
    cells: list[Cell] = args.cells
    opts = Options(
        requests=args.requests,
        deadline_s=args.deadline,
        tries=args.tries,
        idle_timeout_s=args.idle_timeout,
        supervised=args.supervised,
        prefill=args.prefill,
        decode=args.decode,
        prompt_len=args.prompt_len,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    logs = Path(tempfile.mkdtemp(prefix="pdserve-chaos-matrix-"))
    model = _model(args.model, logs)
    fleet = Fleet(str(model), logs, opts)
    started = time.monotonic()
    fleet.start()
    try:
        report = asyncio.run(run_matrix(fleet, cells))
    finally:
        fleet.stop()
    report.update(model=str(model), logs=str(logs), seconds=round(time.monotonic() - started, 1))
    print(table(report))
    print_summary(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if report["findings"] else 0


def _model(name: str | None, logs: Path) -> Path:
    if name is None:
        from tests.support.tiny_models import build_tiny_model

        return build_tiny_model(logs / "tiny-llama", "llama", vocab_size=512, seed=3)
    model = DEFAULT_MODEL if name == "default" else name
    return resolve_model_path(ModelConfig(model=model, cache_dir=default_cache_dir()))


def print_summary(report: dict[str, Any]) -> None:
    rows = [r for r in report["cells"] if r["reached"]]
    totals: Counter[str] = Counter()
    for row in rows:
        totals.update(row["counts"])
    print(
        f"\n{len(rows)}/{len(report['cells'])} cells reached their phase; "
        f"{sum(totals.values())} requests: {totals['identical']} identical, {totals['clean']} "
        f"clean status, {totals['lost']} lost; "
        f"{sum(r['leaked_blocks'] for r in rows)} blocks leaked; {report['seconds']} s in all; "
        f"logs in {report['logs']}"
    )
    for finding in report["findings"]:
        print(f"FINDING: {finding}")


if __name__ == "__main__":
    sys.exit(main())
