"""In-process stand-ins for worker clients, for routing and failover tests without processes.

The fake "model" is deterministic: the next token of a sequence is a hash of the whole sequence
(and of the seed, for a seeded request that samples), so recomputing a prefix anywhere continues
exactly as an undisturbed run would (as the real tiers do). Each fake keeps the prompts it saw
as its "prefix cache" and reports the full blocks of a new prompt found there as
``cached_tokens``, as the workers do."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from core.sampling import FinishReason, SamplingParams, TokenLogprob
from gateway.errors import UpstreamError
from gateway.registry import Registry, TierRegistry
from gateway.worker_calls import TokenEvent
from gateway.worker_clients import PrefillOutcome, WorkerStatus
from gateway.worker_entry import WorkerEntry


def next_token(seq: Sequence[int]) -> int:
    h = 17
    for t in seq:
        h = (h * 31 + t) % 1_000_003
    return 3 + h % 400


BLOCK = 16  # the fakes' block size, for cached_tokens


def sampled_token(seq: Sequence[int], sampling: SamplingParams) -> int:
    """The next token: greedy's, or for a seeded request that samples, one drawn from
    ``(seed, seq)`` (the same wherever it is computed, as the real sampler's)."""
    if sampling.greedy or sampling.seed is None:
        return next_token(seq)
    return next_token([*seq, sampling.seed % 1_000_003])


def greedy(prompt: Sequence[int], n: int, sampling: SamplingParams | None = None) -> list[int]:
    """``n`` tokens after ``prompt`` (drawn as ``sampling`` says; default greedy)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq) if sampling is None else sampled_token(seq, sampling))
    return seq[len(prompt) :]


def cached_prefix(seen: list[list[int]], prompt: Sequence[int]) -> int:
    """Full blocks of ``prompt`` a cache holding ``seen`` has, in tokens (at least one token
    left to compute, as the scheduler leaves)."""
    best = 0
    for other in seen:
        common = 0
        for a, b in zip(other, prompt, strict=False):
            if a != b:
                break
            common += 1
        best = max(best, common)
    return min(best, len(prompt) - 1) // BLOCK * BLOCK


def fake_logprob(token: int, n: int | None) -> tuple[TokenLogprob, ...]:
    """What a worker would report with ``logprobs=n``: the token likeliest, then token+1..."""
    if n is None:
        return ()
    top = tuple((token + i, -0.25 - i) for i in range(n))
    return (TokenLogprob(token, -0.25, top),)


def dead(tier: str, address: str) -> UpstreamError:
    return UpstreamError(
        grpc.StatusCode.UNAVAILABLE,
        f"{tier} worker {address}: connection reset",
        tier=tier,
        address=address,
        retryable=True,
    )


@dataclass
class Call:
    prompt: list[int]
    max_tokens: int
    remote: bool
    seed: int | None = None
    resumed_tokens: int = 0
    min_tokens: int = 0
    sampling: SamplingParams | None = None  # all of it, as the worker receives it
    produced_before: int = 0  # tokens the worker had produced (for anyone) when this came


@dataclass
class FakeDecodeStream:
    client: FakeDecode
    prompt: list[int]
    sampling: SamplingParams
    remote: bool
    cached: int = 0  # prompt tokens found in the client's cache (reserved or computed)
    fail: UpstreamError | None = None  # raised on the first read of tokens
    cancelled: bool = False
    pages_lost: bool = False  # the prefill's pages never arrive

    async def ticket(self) -> object:
        if self.client.refuse is not None:
            raise self.client.refuse
        return object()

    async def arrival(self) -> None:
        if self.pages_lost:
            await asyncio.Event().wait()
        if self.client.dies_during_prefill:
            raise dead("decode", self.client.address)

    async def events(self) -> AsyncIterator[TokenEvent]:
        if self.fail is not None:
            raise self.fail
        seq = list(self.prompt)
        emitted = 0
        cached = self.cached
        if self.remote:  # the prefill worker sampled the first token
            seq.append(sampled_token(seq, self.sampling))
            emitted = 1
        while emitted < self.sampling.max_tokens:
            if self.client.die_after is not None and self.client.produced >= self.client.die_after:
                raise dead("decode", self.client.address)
            await asyncio.sleep(0)
            token = sampled_token(seq, self.sampling)
            seq.append(token)
            emitted += 1
            self.client.produced += 1
            done = emitted == self.sampling.max_tokens
            finish = FinishReason.LENGTH if done else None
            lps = fake_logprob(token, self.sampling.logprobs)
            yield TokenEvent((token,), finish, lps, cached)
            cached = 0  # on the first chunk only

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeDecode:
    address: str
    tier: str = "decode"
    die_after: int | None = None  # tokens this worker produces before it "dies"
    refuse: UpstreamError | None = None
    produced: int = 0
    calls: list[Call] = field(default_factory=list)
    streams: list[FakeDecodeStream] = field(default_factory=list)
    seen: list[list[int]] = field(default_factory=list)  # its "prefix cache"
    fail_streams: dict[int, UpstreamError] = field(default_factory=dict)
    """The stream of call k (0-based) raises this when read."""
    lose_pages: set[int] = field(default_factory=set)
    """The prefill's pages for call k (0-based) never arrive."""
    dies_during_prefill: bool = False
    """Its REMOTE streams fail while the prefill runs."""

    def open(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        *,
        remote_prefill: bool,
        timeout: float | None,
        resumed_tokens: int = 0,
    ) -> FakeDecodeStream:
        self.calls.append(
            Call(
                list(prompt),
                sampling.max_tokens,
                remote_prefill,
                sampling.seed,
                resumed_tokens,
                sampling.min_tokens,
                sampling,
                self.produced,
            )
        )
        cached = cached_prefix(self.seen, prompt)
        self.seen.append(list(prompt))
        stream = FakeDecodeStream(
            self,
            list(prompt),
            sampling,
            remote_prefill,
            cached,
            self.fail_streams.get(len(self.streams)),
            pages_lost=len(self.streams) in self.lose_pages,
        )
        self.streams.append(stream)
        return stream

    async def close(self) -> None:
        pass


@dataclass
class FakePrefill:
    address: str
    tier: str = "prefill"
    fail: UpstreamError | None = None
    calls: list[Call] = field(default_factory=list)
    seen: list[list[int]] = field(default_factory=list)  # its "prefix cache"
    delays: dict[int, float] = field(default_factory=dict)  # call k takes this long
    cancelled: int = 0  # prefills cancelled while they ran

    async def prefill(
        self,
        request_id: str,
        prompt: list[int],
        sampling: SamplingParams,
        ticket: object,
        timeout: float | None,
        resumed_tokens: int = 0,
    ) -> PrefillOutcome:
        self.calls.append(
            Call(
                list(prompt),
                sampling.max_tokens,
                True,
                sampling.seed,
                resumed_tokens,
                sampling.min_tokens,
                sampling,
            )
        )
        if self.fail is not None:
            raise self.fail
        try:
            await asyncio.sleep(self.delays.get(len(self.calls) - 1, 0.0))
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finish = FinishReason.LENGTH if sampling.max_tokens == 1 else None
        first = sampled_token(prompt, sampling)
        lps = fake_logprob(first, sampling.logprobs)
        cached = cached_prefix(self.seen, prompt)
        self.seen.append(list(prompt))
        return PrefillOutcome(first, finish, lps[0] if lps else None, cached)

    async def close(self) -> None:
        pass


def load(**kw: object) -> WorkerStatus:
    fields: dict[str, object] = {
        "total_blocks": 100,
        "free_blocks": 100,
        "running": 0,
        "waiting": 0,
        "pending_transfers": 0,
        "pool_ok": True,
        "max_num_seqs": 8,
        **kw,
    }
    return WorkerStatus(tier="", **fields)  # type: ignore[arg-type]


def entry(client: object, **kw: object) -> WorkerEntry:
    e = WorkerEntry(client)  # type: ignore[arg-type]
    e.on_health(True)
    e.on_load(load(**kw))
    return e


def registry(prefill: Sequence[WorkerEntry], decode: Sequence[WorkerEntry]) -> Registry:
    """Tiers holding these entries (with fresh load reports); a prefill tier is "configured"
    when ``prefill`` is not empty."""

    def tier(name: str, entries: Sequence[WorkerEntry]) -> TierRegistry:
        t = TierRegistry(name, [f"{e.address}:1" for e in entries], lambda a: None)  # type: ignore
        for e in entries:
            t.add_entry(e)
        t.stale_after_s = 1e9  # the reports never age in these tests
        return t

    return Registry(tier("prefill", prefill), tier("decode", decode))
