"""Routing policies and conditional disaggregation over fake workers."""

from __future__ import annotations

import collections
import random

import pytest

from core.prefix_summary import PrefixSummary
from gateway.errors import NoWorkersError, OverloadedError
from gateway.router import Router, RoutingConfig
from gateway.worker_entry import WorkerState
from tests.gateway.fakes import FakeDecode, FakePrefill, entry, load, registry

PROMPT = list(range(10, 110))  # 100 tokens


def _prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 500) for _ in range(length)]


def _router(prefill: list, decode: list, **config: object) -> Router:
    return Router(registry(prefill, decode), RoutingConfig(**config))  # type: ignore[arg-type]


def test_decode_goes_to_the_least_loaded_worker() -> None:
    busy = entry(FakeDecode("d0"), running=6, free_blocks=40)
    idle = entry(FakeDecode("d1"), running=1, free_blocks=90)
    router = _router([], [busy, idle])
    assert router.route(PROMPT).decode is idle


def test_equal_workers_share_a_burst() -> None:
    decode = [entry(FakeDecode(f"d{i}")) for i in range(2)]
    prefill = [entry(FakePrefill(f"p{i}")) for i in range(2)]
    router = _router(prefill, decode, affinity_tokens=0)
    picks = collections.Counter()
    for i in range(8):  # no load report in between: the gateway counts what it sent
        route = router.route([i, *PROMPT])
        route.decode.assign()
        assert route.prefill is not None
        route.prefill.assign()
        picks[route.decode.address] += 1
        picks[route.prefill.address] += 1
    assert picks == {"d0": 4, "d1": 4, "p0": 4, "p1": 4}


def test_full_draining_and_dead_workers_get_no_work() -> None:
    full = entry(FakeDecode("d0"), max_in_flight=4, in_flight=4)
    draining = entry(FakeDecode("d1"))
    draining.on_health(False)
    assert draining.state is WorkerState.DRAINING
    down = entry(FakeDecode("d2"))
    down.on_down("connection reset")
    ok = entry(FakeDecode("d3"), running=7)
    router = _router([], [full, draining, down, ok])
    assert {router.route(PROMPT).decode.address for _ in range(5)} == {"d3"}
    with pytest.raises(OverloadedError) as info:
        _router([], [full]).route(PROMPT)
    assert info.value.retry_after_s > 0
    with pytest.raises(NoWorkersError, match="1 draining"):
        _router([], [draining, down]).route(PROMPT)


def test_stale_load_reports_make_a_worker_unroutable() -> None:
    stale = entry(FakeDecode("d0"))
    fresh = entry(FakeDecode("d1"), running=5)
    router = _router([], [stale, fresh])
    router.registry.decode.stale_after_s = 1.0
    stale.load_at -= 5
    assert router.route(PROMPT).decode is fresh


def test_prefill_shortest_queue_with_prefix_affinity() -> None:
    p0 = entry(FakePrefill("p0"), waiting=1)
    p1 = entry(FakePrefill("p1"), waiting=0)
    router = _router([p0, p1], [entry(FakeDecode("d0"))], affinity_tokens=32)
    first = router.route(PROMPT)
    assert first.prefill is p1
    p1.on_load(load(waiting=2))  # the affine worker is a little busier now: still preferred
    assert router.route(PROMPT).prefill is p1
    assert router.route([1, *PROMPT]).prefill is p0  # another prefix: shortest queue
    p1.on_load(load(waiting=9))  # much busier: affinity gives way
    assert router.route(PROMPT).prefill is p0


def test_conditional_disaggregation_decisions() -> None:
    decode = [entry(FakeDecode("d0"))]
    assert _router([], decode).route(PROMPT).decision == "colocated"
    prefill = [entry(FakePrefill("p0"))]
    router = _router(prefill, decode, local_prefill_below=64)
    assert router.route(PROMPT[:10]) == router.route(PROMPT[:10])  # deterministic
    short = router.route(PROMPT[:10])
    assert (short.decision, short.prefill) == ("local_short_prompt", None)
    assert router.route(PROMPT).decision == "disaggregated"
    saturated = _router(
        [entry(FakePrefill("p0"), waiting=5)], decode, prefill_saturated_queue=4
    ).route(PROMPT)
    assert (saturated.decision, saturated.prefill) == ("local_prefill_saturated", None)
    busy_decode = [entry(FakeDecode("d0"), running=7)]
    no_headroom = _router(
        [entry(FakePrefill("p0"), waiting=5)], busy_decode, prefill_saturated_queue=4
    ).route(PROMPT)
    assert no_headroom.decision == "disaggregated"
    gone = entry(FakePrefill("p0"))
    gone.on_down("killed")
    assert _router([gone], decode).route(PROMPT).decision == "local_no_prefill"


def test_round_robin_ignores_load() -> None:
    decode = [entry(FakeDecode("d0"), running=7), entry(FakeDecode("d1"))]
    router = _router([], decode, policy="round-robin")
    assert [router.route(PROMPT).decode.address for _ in range(4)] == ["d0", "d1", "d0", "d1"]
    with pytest.raises(ValueError, match="unknown routing policy"):
        _router([], decode, policy="random")


def test_workers_that_failed_this_request_are_avoided_when_possible() -> None:
    decode = [entry(FakeDecode("d0")), entry(FakeDecode("d1"), running=7)]
    router = _router([], decode)
    assert router.route(PROMPT, avoid_decode={"d0"}).decode.address == "d1"
    assert router.route(PROMPT, avoid_decode={"d0", "d1"}).decode.address == "d0"


def _advertising(prompt: list[int], blocks: int, block_size: int = 16) -> frozenset[bytes]:
    """What a worker holding ``prompt``'s first ``blocks`` blocks advertises (as its servicer
    would: the same summary code over a pool that holds exactly those blocks)."""
    summary = PrefixSummary(block_size)
    summary.record(prompt)
    return frozenset(summary.advertised(lambda chains: [min(blocks, len(c)) for c in chains]))


def test_prefill_goes_to_the_worker_reporting_the_prompts_prefix() -> None:
    shared = _prompt(1, 200)
    holder = entry(FakePrefill("p0"), waiting=2, cached_prefixes=_advertising(shared, 8))
    idle = entry(FakePrefill("p1"), waiting=0)
    router = _router([holder, idle], [entry(FakeDecode("d0"))], affinity_tokens=0)
    route = router.route([*shared[:150], 7, 7, 7])  # shares 9 blocks: 8 are cached on p0
    assert (route.prefill, route.prefill_reason, route.fallbacks) == (
        holder,
        "worker_prefix_cache",
        (),
    )
    other = router.route(_prompt(2, 200))  # no worker holds it: shortest queue
    assert (other.prefill, other.prefill_reason) == (idle, "shortest_queue")
    short = router.route(shared[:16])  # not one full block to reuse: no affinity
    assert short.prefill is idle


def test_the_longest_cached_prefix_wins() -> None:
    system = _prompt(3, 64)  # a system prompt every worker has cached
    turn = [*system, *_prompt(4, 256)]  # one conversation, served before by p1
    p0 = entry(FakePrefill("p0"), cached_prefixes=_advertising([*system, *_prompt(8, 50)], 4))
    p1 = entry(FakePrefill("p1"), waiting=1, cached_prefixes=_advertising(turn, 20))
    router = _router([p0, p1], [entry(FakeDecode("d0"))], affinity_tokens=0)
    assert router.route([*turn, 9, 9]).prefill is p1
    assert router.route([*system, *_prompt(5, 100)]).prefill is p0  # ties on depth: queue


def test_an_overloaded_prefix_holder_gives_way_and_the_fallback_is_reported() -> None:
    shared = _prompt(6, 200)
    holder = entry(FakePrefill("p0"), waiting=9, cached_prefixes=_advertising(shared, 12))
    idle = entry(FakePrefill("p1"))
    router = _router([holder, idle], [entry(FakeDecode("d0"))], affinity_tokens=0)
    route = router.route(shared)
    assert route.prefill is idle
    assert route.prefill_reason == "shortest_queue"
    assert route.fallbacks == ("prefix_affinity_overloaded",)
    holder.on_load(load(waiting=9, max_in_flight=9, in_flight=9, cached_prefixes=frozenset()))
    full = _router([holder], [entry(FakeDecode("d0"))]).route(shared)
    assert full.prefill is holder and "prefill_all_full" in full.fallbacks


def test_the_workers_block_size_is_used_to_hash_the_prompt() -> None:
    shared = _prompt(7, 200)
    holder = entry(
        FakePrefill("p0"), waiting=1, block_size=32, cached_prefixes=_advertising(shared, 4, 32)
    )
    wrong_size = entry(
        FakePrefill("p1"), block_size=16, cached_prefixes=_advertising(shared, 8, 32)
    )
    router = _router([holder, wrong_size], [entry(FakeDecode("d0"))], affinity_tokens=0)
    assert router.route(shared).prefill is holder


def test_without_reports_the_gateways_own_routing_memory_keeps_affinity() -> None:
    p0, p1 = entry(FakePrefill("p0")), entry(FakePrefill("p1"))
    router = _router([p0, p1], [entry(FakeDecode("d0"))], affinity_tokens=32)
    first = router.route(PROMPT)
    assert first.prefill_reason == "shortest_queue"
    assert first.prefill is not None
    first.prefill.assign()  # one queued on it now; still within the slack
    again = router.route(PROMPT)
    assert (again.prefill, again.prefill_reason) == (first.prefill, "recent_route")


def test_fallbacks_name_reused_failed_workers_and_a_missing_prefill_tier() -> None:
    decode = [entry(FakeDecode("d0"))]
    route = _router([entry(FakePrefill("p0"))], decode).route(
        PROMPT, avoid_decode={"d0"}, avoid_prefill={"p0"}
    )
    assert route.fallbacks == ("decode_failed_worker_reused", "prefill_failed_worker_reused")
    gone = entry(FakePrefill("p0"))
    gone.on_down("killed")
    assert _router([gone], decode).route(PROMPT).fallbacks == ("prefill_unavailable",)
