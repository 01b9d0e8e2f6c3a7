"""In-process stand-ins for worker clients, for routing and failover tests without processes.

The fake "model" is deterministic: the next token of a sequence is a hash of the whole sequence,
so recomputing a prefix anywhere continues exactly as an undisturbed run would (as greedy
decoding does on the real tiers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from core.sampling import FinishReason, SamplingParams, TokenLogprob
from gateway.errors import UpstreamError
from gateway.registry import Registry, TierRegistry, WorkerEntry
from gateway.worker_clients import PrefillOutcome, TokenEvent, WorkerStatus


def next_token(seq: Sequence[int]) -> int:
    h = 17
    for t in seq:
        h = (h * 31 + t) % 1_000_003
    return 3 + h % 400


def greedy(prompt: Sequence[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt) :]


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


@dataclass
class FakeDecodeStream:
    client: FakeDecode
    prompt: list[int]
    sampling: SamplingParams
    remote: bool
    cancelled: bool = False

    async def ticket(self) -> object:
        if self.client.refuse is not None:
            raise self.client.refuse
        return object()

    async def events(self) -> AsyncIterator[TokenEvent]:
        seq = list(self.prompt)
        emitted = 0
        if self.remote:  # the prefill worker sampled the first token
            seq.append(next_token(seq))
            emitted = 1
        while emitted < self.sampling.max_tokens:
            if self.client.die_after is not None and self.client.produced >= self.client.die_after:
                raise dead("decode", self.client.address)
            await asyncio.sleep(0)
            token = next_token(seq)
            seq.append(token)
            emitted += 1
            self.client.produced += 1
            done = emitted == self.sampling.max_tokens
            finish = FinishReason.LENGTH if done else None
            yield TokenEvent((token,), finish, fake_logprob(token, self.sampling.logprobs))

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
            )
        )
        stream = FakeDecodeStream(self, list(prompt), sampling, remote_prefill)
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
        finish = FinishReason.LENGTH if sampling.max_tokens == 1 else None
        first = next_token(prompt)
        lps = fake_logprob(first, sampling.logprobs)
        return PrefillOutcome(first, finish, lps[0] if lps else None)

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
