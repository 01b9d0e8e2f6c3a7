"""n samples of one prompt over fake workers: pinned to sample 0's route once its prompt KV is
cached, seeds base + i, interleaved deltas with their own finishes, cached_tokens, admission
slots, failure and cancellation of every sample."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import grpc
import pytest
from prometheus_client import CollectorRegistry

from core.errors import InvalidRequestError
from core.sampling import FinishReason, SamplingParams
from gateway.errors import UpstreamError
from gateway.fanout import SampleSlots, generate_samples, validate_samples
from gateway.generation import Delta, GenerationCore
from gateway.prompts import PromptTokenizer
from gateway.router import SIBLING_SAMPLE, Router, RoutingConfig
from gateway.seeds import SEED_BITS, sample_seed, with_seed
from server_runtime.grpc_runtime import Lifecycle, Refused
from server_runtime.metrics import GatewayMetrics
from tests.gateway.fakes import BLOCK, FakeDecode, FakePrefill, entry, greedy, load, registry
from tests.support.tokenizers import build_byte_level_tokenizer

PROMPT = list(range(20, 60))  # 40 tokens: 2 full blocks of 16 cached for a sibling
TOKENIZER = build_byte_level_tokenizer(512)


def _core(
    prefill: list, decode: list, metrics: GatewayMetrics | None = None, policy: str = "round-robin"
) -> GenerationCore:
    # round-robin: without the pin, a sibling would land on the next worker
    router = Router(registry(prefill, decode), RoutingConfig(policy=policy, affinity_tokens=0))
    return GenerationCore(TOKENIZER, PromptTokenizer(TOKENIZER, 1024, 512), 1024, router, metrics)


async def _collect(stream: AsyncGenerator[Delta, None]) -> list[Delta]:
    return [d async for d in stream]


def _by_sample(deltas: list[Delta], n: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for d in deltas:
        out[d.index].extend(d.token_ids)
    return out


def _run(core: GenerationCore, sampling: SamplingParams, n: int) -> list[Delta]:
    return asyncio.run(_collect(generate_samples(core, "r", PROMPT, sampling, n, timeout=10)))


@pytest.mark.parametrize("disaggregated", [True, False])
def test_siblings_start_on_sample_0s_workers_once_its_prompt_is_cached(
    disaggregated: bool,
) -> None:
    prefills = [FakePrefill("p0"), FakePrefill("p1")] if disaggregated else []
    decodes = [FakeDecode("d0"), FakeDecode("d1")]
    entries = [entry(d) for d in decodes]
    core = _core([entry(p) for p in prefills], entries)
    deltas = _run(core, SamplingParams(max_tokens=5, temperature=0.0), 3)
    tokens = _by_sample(deltas, 3)
    assert tokens == [greedy(PROMPT, 5)] * 3  # greedy n > 1: identical samples
    [used] = [d for d in decodes if d.calls]  # every sample on sample 0's decode worker
    assert len(used.calls) == 3
    assert all(c.produced_before >= 1 for c in used.calls[1:])  # after sample 0's decode token
    if disaggregated:
        [prefill] = [p for p in prefills if p.calls]
        assert len(prefill.calls) == 3
    finishes = [d for d in deltas if d.finish_reason is not None]
    assert sorted(d.index for d in finishes) == [0, 1, 2]  # each sample ends on its own
    assert all(d.completion_tokens == 5 for d in finishes)
    assert [d.cached_tokens for d in finishes] == [0, 2 * BLOCK, 2 * BLOCK]  # siblings hit
    assert all(s.cancelled for s in used.streams) and all(e.active == 0 for e in entries)


def test_sample_i_draws_from_seed_plus_i_and_reports_its_own_seed() -> None:
    decode = FakeDecode("d0")
    core = _core([entry(FakePrefill("p0"))], [entry(decode)])
    sampling = SamplingParams(max_tokens=6, temperature=0.9, seed=1000)
    deltas = _run(core, sampling, 3)
    tokens = _by_sample(deltas, 3)
    for i in range(3):
        alone = SamplingParams(max_tokens=6, temperature=0.9, seed=1000 + i)
        assert tokens[i] == greedy(PROMPT, 6, alone)  # = an n=1 request with seed + i
    assert len(set(map(tuple, tokens))) == 3
    firsts = {d.index: d.seed for d in deltas if d.seed is not None}
    assert firsts == {0: 1000, 1: 1001, 2: 1002}
    assert sorted(c.seed for c in decode.calls) == [1000, 1001, 1002]
    assert _by_sample(_run(core, sampling, 3), 3) == tokens  # reproducible by seed


def test_an_unseeded_sampled_request_gets_one_base_seed() -> None:
    decode = FakeDecode("d0")
    core = _core([], [entry(decode)])
    deltas = _run(core, SamplingParams(max_tokens=2, temperature=1.0), 2)
    seeds = {d.index: d.seed for d in deltas if d.seed is not None}
    assert seeds[1] == seeds[0] + 1
    base = with_seed(SamplingParams(temperature=1.0), 16).seed
    assert base is not None and base + 15 < 2**SEED_BITS
    assert sample_seed(2**64 - 1, 1) == 0  # a caller's seed wraps within uint64


def test_a_gone_pin_falls_back_to_normal_routing() -> None:
    d0, d1 = FakeDecode("d0"), FakeDecode("d1")
    e0, e1 = entry(d0), entry(d1, running=3)  # d0 looks less loaded: sample 0 goes there
    core = _core([], [e0, e1], policy="load-aware")
    original = d0.open

    def open_then_die(*args, **kwargs):  # type: ignore[no-untyped-def]
        e0.on_down("killed")  # it leaves the routable set before the siblings are routed
        return original(*args, **kwargs)

    d0.open = open_then_die  # type: ignore[method-assign]
    deltas = _run(core, SamplingParams(max_tokens=3, temperature=0.0), 3)
    assert _by_sample(deltas, 3) == [greedy(PROMPT, 3)] * 3
    assert len(d0.calls) == 1 and len(d1.calls) == 2


def test_router_pins_only_routable_open_workers() -> None:
    d, p = entry(FakeDecode("d0")), entry(FakePrefill("p0"))
    router = Router(registry([p], [d]))
    route = router.route(PROMPT)
    pinned = router.pinned(route)
    assert pinned is not None and (pinned.prefill, pinned.decode) == (p, d)
    assert (pinned.decision, pinned.prefill_reason) == ("disaggregated", SIBLING_SAMPLE)
    p.on_load(load(in_flight=4, max_in_flight=4))
    assert router.pinned(route) is None  # at its limit: route afresh
    p.on_load(load())
    assert router.pinned(route) is not None
    d.on_down("gone")
    assert router.pinned(route) is None


def test_a_failed_sibling_fails_the_request_and_cancels_every_sample() -> None:
    refused = UpstreamError(grpc.StatusCode.INVALID_ARGUMENT, "bad", tier="decode", address="d0")
    decode = FakeDecode("d0", fail_streams={1: refused})
    e = entry(decode)
    core = _core([], [e])
    with pytest.raises(UpstreamError, match="bad"):
        _run(core, SamplingParams(max_tokens=50, temperature=0.0), 3)
    assert len(decode.streams) == 3 and all(s.cancelled for s in decode.streams)
    assert e.active == 0


def test_leaving_early_cancels_every_sample() -> None:
    prefill, decode = FakePrefill("p0"), FakeDecode("d0")
    pe, de = entry(prefill), entry(decode)
    core = _core([pe], [de])

    async def go() -> None:
        sampling = SamplingParams(max_tokens=200, temperature=0.0)
        stream = generate_samples(core, "r", PROMPT, sampling, 4, timeout=10)
        seen: set[int] = set()
        async for delta in stream:
            seen.add(delta.index)
            if len(seen) == 4:
                break
        await stream.aclose()

    asyncio.run(go())
    assert len(decode.streams) == 4 and all(s.cancelled for s in decode.streams)
    assert de.active == 0 and pe.active == 0
    assert decode.produced < 4 * 200  # nobody ran to the end


def test_n_is_checked() -> None:
    validate_samples(1)
    validate_samples(16)
    for bad in (0, 17, -1):
        with pytest.raises(InvalidRequestError, match=r"n must be in \[1, 16\]"):
            validate_samples(bad)


def test_samples_take_their_slots_all_or_none() -> None:
    async def go() -> None:
        lc = Lifecycle(max_in_flight=4, max_queued=8)
        await lc.enter()  # the call's own slot (the interceptor's)
        slots = SampleSlots(lc, 3)
        await slots.take()
        assert lc.in_flight == 3
        with pytest.raises(Refused) as info:
            await SampleSlots(lc, 3).take()  # 2 more do not fit in the 1 left
        assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert lc.in_flight == 3  # none taken
        slots.release()
        slots.release()  # idempotent
        assert lc.in_flight == 1
        with pytest.raises(InvalidRequestError, match="--max-concurrent-requests"):
            await SampleSlots(lc, 5).take()
        await SampleSlots(None, 16).take()  # no lifecycle: nothing to take

    asyncio.run(go())


def test_each_sample_is_accounted_as_a_request() -> None:
    from gateway.accounting import RequestClock

    reg = CollectorRegistry()
    metrics = GatewayMetrics(reg)
    core = _core([], [entry(FakeDecode("d0"))], metrics)

    async def go() -> None:
        clock = RequestClock(metrics)
        sampling = SamplingParams(max_tokens=4, temperature=0.0)
        clock.accepted(PROMPT, sampling, 3)
        async for delta in generate_samples(core, "r", PROMPT, sampling, 3, timeout=10):
            clock.delta(delta)
        clock.done()

    asyncio.run(go())
    ok = reg.get_sample_value("pdserve_requests_total", {"tier": "gateway", "code": "OK"})
    assert ok == 3
    assert reg.get_sample_value("pdserve_prompt_tokens_total", {"tier": "gateway"}) == 40
    assert reg.get_sample_value("pdserve_generation_tokens_total", {"tier": "gateway"}) == 12


def test_finish_reasons_are_per_sample() -> None:
    core = _core([], [entry(FakeDecode("d0"))])
    deltas = _run(core, SamplingParams(max_tokens=1, temperature=0.0), 2)
    assert [(d.index, d.finish_reason) for d in deltas] == [
        (0, FinishReason.LENGTH),
        (1, FinishReason.LENGTH),
    ]
