"""Failover in the gateway's request flow, over fake workers: failed prefills retried elsewhere,
broken decode streams resumed elsewhere with no duplicated or missing tokens."""

from __future__ import annotations

import asyncio
import functools

import grpc
import pytest
from prometheus_client import CollectorRegistry

from core.sampling import FinishReason, SamplingParams
from gateway.errors import UpstreamError
from gateway.generation import FailoverConfig, GenerationCore
from gateway.prompts import PromptTokenizer
from gateway.router import Router, RoutingConfig
from server_runtime.metrics import GatewayMetrics
from tests.gateway.fakes import FakeDecode, FakePrefill, dead, entry, greedy, registry
from tests.support.tokenizers import build_byte_level_tokenizer

PROMPT = list(range(20, 60))


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_level_tokenizer(512)


def _core(
    tokenizer, prefill: list, decode: list, attempts: int = 4, metrics: GatewayMetrics | None = None
) -> GenerationCore:
    router = Router(registry(prefill, decode), RoutingConfig(affinity_tokens=0))
    prompts = PromptTokenizer(tokenizer, 1024, 512)
    return GenerationCore(
        tokenizer, prompts, 1024, router, metrics, failover=FailoverConfig(max_attempts=attempts)
    )


async def _tokens(
    core: GenerationCore, max_tokens: int, temperature: float = 0.0, seed: int | None = None
) -> tuple[list[int], FinishReason | None]:
    tokens: list[int] = []
    finish = None
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    async for delta in core.generate("r1", PROMPT, sampling, timeout=10):
        tokens.extend(delta.token_ids)
        finish = delta.finish_reason
    return tokens, finish


def test_decode_death_mid_stream_resumes_elsewhere_token_identically(tokenizer) -> None:
    dying = FakeDecode("d0", die_after=5)
    healthy = FakeDecode("d1")
    d0, d1 = entry(dying), entry(healthy, running=3)  # d0 looks less loaded: it goes first
    core = _core(tokenizer, [entry(FakePrefill("p0"))], [d0, d1])
    tokens, finish = asyncio.run(_tokens(core, 20))
    assert tokens == greedy(PROMPT, 20)  # no duplicated, no missing tokens
    assert finish is FinishReason.LENGTH
    [resumed] = healthy.calls
    assert resumed.prompt == PROMPT + tokens[:6]  # first token (prefill) + 5 decoded
    assert resumed.max_tokens == 14
    assert all(s.cancelled for s in dying.streams)
    assert d0.active == 0 and d1.active == 0


def test_colocated_stream_resumes_too(tokenizer) -> None:
    dying, healthy = FakeDecode("d0", die_after=3), FakeDecode("d1")
    core = _core(tokenizer, [], [entry(dying), entry(healthy, running=3)])
    tokens, _ = asyncio.run(_tokens(core, 12))
    assert tokens == greedy(PROMPT, 12)
    assert [c.remote for c in healthy.calls] == [False]


def test_prefill_failure_before_the_first_token_is_retried_on_another_worker(tokenizer) -> None:
    broken = FakePrefill("p0", fail=dead("prefill", "p0"))
    good = FakePrefill("p1")
    decode = FakeDecode("d0")
    core = _core(tokenizer, [entry(broken), entry(good, waiting=2)], [entry(decode)])
    tokens, _ = asyncio.run(_tokens(core, 8))
    assert tokens == greedy(PROMPT, 8)
    assert len(broken.calls) == 1 and len(good.calls) == 1
    assert len(decode.streams) == 2 and decode.streams[0].cancelled  # reservation released


def test_full_decode_worker_is_skipped(tokenizer) -> None:
    full = FakeDecode(
        "d0",
        refuse=UpstreamError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "out of blocks",
            tier="decode",
            address="d0",
            retryable=True,
            retry_after_s=0.3,
        ),
    )
    core = _core(
        tokenizer, [entry(FakePrefill("p0"))], [entry(full), entry(FakeDecode("d1"), running=4)]
    )
    tokens, _ = asyncio.run(_tokens(core, 4))
    assert tokens == greedy(PROMPT, 4)
    core = _core(tokenizer, [entry(FakePrefill("p0"))], [entry(full)], attempts=2)
    with pytest.raises(UpstreamError) as info:
        asyncio.run(_tokens(core, 4))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.retry_after_s == 0.3


def test_no_worker_left_to_resume_ends_unavailable_with_a_message(tokenizer) -> None:
    core = _core(tokenizer, [], [entry(FakeDecode("d0", die_after=4))], attempts=3)
    with pytest.raises(UpstreamError) as info:
        asyncio.run(_tokens(core, 12))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "after 4 tokens" in str(info.value) and "could not be resumed" in str(info.value)


def test_bad_requests_are_not_retried(tokenizer) -> None:
    bad = UpstreamError(grpc.StatusCode.INVALID_ARGUMENT, "bad", tier="prefill", address="p0")
    p0, p1 = FakePrefill("p0", fail=bad), FakePrefill("p1")
    core = _core(tokenizer, [entry(p0), entry(p1, waiting=3)], [entry(FakeDecode("d0"))])
    with pytest.raises(UpstreamError) as info:
        asyncio.run(_tokens(core, 4))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not p1.calls


def _count(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"tier": "gateway", **labels}) or 0.0


def test_a_sampled_request_without_a_seed_gets_one_on_every_hop_resumes_included(
    tokenizer,
) -> None:
    prefill, dying, healthy = FakePrefill("p0"), FakeDecode("d0", die_after=3), FakeDecode("d1")
    core = _core(tokenizer, [entry(prefill)], [entry(dying), entry(healthy, running=3)])
    tokens, _ = asyncio.run(_tokens(core, 10, temperature=0.8))
    assert len(tokens) == 10
    seeds = {c.seed for c in [*prefill.calls, *dying.calls, *healthy.calls]}
    assert len(healthy.calls) == 1 and len(seeds) == 1 and None not in seeds
    assert len(prefill.calls) == 2  # the resume prefilled prompt + tokens again, same seed

    again = FakeDecode("d2")
    core = _core(tokenizer, [], [entry(again)])
    asyncio.run(_tokens(core, 4, temperature=0.8))
    assert again.calls[0].seed not in (None, *seeds)  # a fresh seed per request
    asyncio.run(_tokens(core, 4, temperature=0.8, seed=1234))
    asyncio.run(_tokens(core, 4))
    assert [c.seed for c in again.calls[1:]] == [1234, None]  # given seeds kept; greedy: none


def test_retries_resumes_and_fallbacks_are_counted(tokenizer) -> None:
    metrics_registry = CollectorRegistry()
    metrics = GatewayMetrics(metrics_registry)
    broken = FakePrefill("p0", fail=dead("prefill", "p0"))
    good = FakePrefill("p1")
    dying, healthy = FakeDecode("d0", die_after=5), FakeDecode("d1")
    core = _core(
        tokenizer,
        [entry(broken), entry(good, waiting=2)],
        [entry(dying), entry(healthy, running=3)],
        metrics=metrics,
    )
    tokens, _ = asyncio.run(_tokens(core, 20))
    assert tokens == greedy(PROMPT, 20)
    count = functools.partial(_count, metrics_registry)
    retries = "pdserve_prefill_retries_total"
    assert count(retries, failed_tier="prefill", reason="unavailable") == 1
    assert count("pdserve_decode_resumes_total", outcome="resumed") == 1
    assert count("pdserve_decode_resumes_total", outcome="failed") == 0
    picks = "pdserve_router_prefill_picks_total"
    assert count(picks, reason="shortest_queue") == 3  # first try, retry, resume

    core = _core(tokenizer, [], [entry(FakeDecode("d0", die_after=4))], 3, metrics)
    with pytest.raises(UpstreamError):
        asyncio.run(_tokens(core, 12))
    assert count("pdserve_decode_resumes_total", outcome="failed") == 1
    fallbacks = "pdserve_router_fallbacks_total"
    assert count(fallbacks, reason="decode_failed_worker_reused") == 2  # attempts 2 and 3


def test_a_resume_carries_the_options_and_the_tokens_it_already_generated(tokenizer) -> None:
    """The resumed hop's penalties count the tokens received so far as output
    (``resumed_tokens``) and its min_tokens is lowered by as many, as max_tokens is."""
    prefill, dying, healthy = FakePrefill("p0"), FakeDecode("d0", die_after=3), FakeDecode("d1")
    core = _core(tokenizer, [entry(prefill)], [entry(dying), entry(healthy, running=3)])
    sampling = SamplingParams(
        max_tokens=10, temperature=0.0, min_tokens=6, repetition_penalty=1.3, presence_penalty=1
    )

    async def run() -> list[int]:
        return [t async for d in core.generate("r1", PROMPT, sampling, 10) for t in d.token_ids]

    tokens = asyncio.run(run())
    assert tokens == greedy(PROMPT, 10)
    first_hop = [*prefill.calls[:1], *dying.calls]
    assert [(c.resumed_tokens, c.min_tokens) for c in first_hop] == [(0, 6), (0, 6)]
    [resumed] = healthy.calls
    assert resumed.prompt == PROMPT + tokens[:4]
    assert (resumed.resumed_tokens, resumed.min_tokens, resumed.max_tokens) == (4, 2, 6)
    assert (prefill.calls[1].resumed_tokens, prefill.calls[1].min_tokens) == (4, 2)


def test_the_seed_comes_back_on_the_first_delta_only(tokenizer) -> None:
    core = _core(tokenizer, [], [entry(FakeDecode("d0"))])

    async def seeds(sampling: SamplingParams) -> list[int | None]:
        return [d.seed async for d in core.generate("r1", PROMPT, sampling, timeout=10)]

    assigned = asyncio.run(seeds(SamplingParams(max_tokens=3, temperature=0.7)))
    assert assigned[0] is not None and assigned[1:] == [None, None]
    given = asyncio.run(seeds(SamplingParams(max_tokens=2, temperature=0.7, seed=42)))
    assert given == [42, None]
    assert asyncio.run(seeds(SamplingParams(max_tokens=2, temperature=0.0, seed=42))) == [
        None,
        None,
    ]  # greedy: no seed in play


def test_pages_that_never_arrive_resume_the_request_on_another_route(tokenizer) -> None:
    """The prefill answered but its pages never reached the decode worker (a cut link between
    the tiers): after kv_arrival_timeout_s the attempt fails retryable, blaming the prefill
    worker, and the request resumes elsewhere with the first token kept, token-identical."""
    stranded = FakeDecode("d0", lose_pages={0})
    other = FakeDecode("d1")
    p0, p1 = FakePrefill("p0"), FakePrefill("p1")
    router = Router(
        registry([entry(p0), entry(p1, waiting=2)], [entry(stranded), entry(other, running=3)]),
        RoutingConfig(affinity_tokens=0),
    )
    core = GenerationCore(
        tokenizer,
        PromptTokenizer(tokenizer, 1024, 512),
        1024,
        router,
        None,
        failover=FailoverConfig(max_attempts=4, kv_arrival_timeout_s=0.2),
    )
    tokens, finish = asyncio.run(_tokens(core, 10))
    assert tokens == greedy(PROMPT, 10) and finish is FinishReason.LENGTH
    assert [len(c.prompt) for c in p0.calls] == [len(PROMPT)]
    assert [c.prompt for c in p1.calls] == [PROMPT + tokens[:1]]  # the first token kept
    assert stranded.streams[0].cancelled  # its reservation is released


def test_a_decode_worker_that_dies_while_the_prefill_runs_fails_over_at_once(tokenizer) -> None:
    """The decode stream is watched while the prefill computes: its failure cancels the
    prefill (no work for nobody) and the request goes to another route at once."""
    doomed = FakeDecode("d0", dies_during_prefill=True)
    other = FakeDecode("d1")
    slow = FakePrefill("p0", delays={0: 30.0})  # its first prefill would take 30 s
    router = Router(
        registry([entry(slow)], [entry(doomed), entry(other, running=3)]),
        RoutingConfig(affinity_tokens=0),
    )
    core = GenerationCore(tokenizer, PromptTokenizer(tokenizer, 1024, 512), 1024, router, None)

    async def run() -> tuple[list[int], float]:
        started = asyncio.get_running_loop().time()
        tokens, _ = await _tokens(core, 6)
        return tokens, asyncio.get_running_loop().time() - started

    tokens, took = asyncio.run(run())
    assert tokens == greedy(PROMPT, 6)
    assert took < 5.0 and slow.cancelled == 1  # not the 30 s prefill
    assert [c.prompt for c in other.calls] == [PROMPT]  # a plain retry: no token was out
