"""vLLM's serving metrics on hand-made timelines, with values worked out by hand."""

from __future__ import annotations

import pytest

from pdserve.bench.metrics import RequestOutcome, compute_metrics, parse_goodput

# A: sent at 0.0, first token at 0.1, then gaps 0.05, 0.05, 0.1 -> 4 tokens, E2E 0.3,
#    TPOT (0.3 - 0.1) / 3.
A = RequestOutcome(
    success=True,
    prompt_len=10,
    output_tokens=4,
    ttft_s=0.1,
    itl_s=(0.05, 0.05, 0.1),
    latency_s=0.3,
    start_s=0.0,
)
# B: sent at 0.5, one token at 0.7: TPOT undefined (0 for goodput), no gaps.
B = RequestOutcome(
    success=True, prompt_len=20, output_tokens=1, ttft_s=0.2, latency_s=0.2, start_s=0.5
)
# C: failed; counts towards the number of requests only.
C = RequestOutcome(success=False, prompt_len=30, start_s=0.6, error="UNAVAILABLE: down")


def test_counts_and_throughput() -> None:
    m = compute_metrics([A, B, C], duration_s=2.0)
    assert (m.num_requests, m.completed, m.failed) == (3, 2, 1)
    assert m.completion_rate == pytest.approx(2 / 3)
    assert m.total_input_tokens == 30  # failed requests' prompts are not counted
    assert m.total_output_tokens == 5
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_throughput == pytest.approx(2.5)
    assert m.total_token_throughput == pytest.approx(17.5)
    assert m.request_goodput is None and m.good_requests is None


def test_ttft_and_e2e_over_completed_requests() -> None:
    m = compute_metrics([A, B, C], duration_s=2.0)
    assert m.ttft.mean_ms == pytest.approx(150.0)
    assert m.ttft.median_ms == pytest.approx(150.0)
    assert m.ttft.std_ms == pytest.approx(50.0)  # population std, as numpy's default
    assert m.ttft.percentiles_ms[90.0] == pytest.approx(190.0)  # 100 + 0.9 * (200 - 100)
    assert m.e2el.mean_ms == pytest.approx(250.0)
    assert m.e2el.percentiles_ms[99.0] == pytest.approx(299.0)  # 200 + 0.99 * 100


def test_tpot_skips_single_token_requests() -> None:
    m = compute_metrics([A, B, C], duration_s=2.0)
    assert A.tpot_s == pytest.approx(0.2 / 3)
    assert B.tpot_s == 0.0
    assert m.tpot.mean_ms == pytest.approx(200 / 3)
    assert m.tpot.percentiles_ms[50.0] == pytest.approx(200 / 3)


def test_itl_pools_every_gap() -> None:
    m = compute_metrics([A, B, C], duration_s=2.0)
    assert m.itl.mean_ms == pytest.approx(200 / 3)
    assert m.itl.median_ms == pytest.approx(50.0)
    # sorted [50, 50, 100]: p90 sits at index 1.8 -> 50 + 0.8 * 50
    assert m.itl.percentiles_ms[90.0] == pytest.approx(90.0)
    assert m.itl.percentiles_ms[99.0] == pytest.approx(99.0)


def test_goodput_counts_requests_meeting_every_slo() -> None:
    assert compute_metrics([A, B, C], 2.0, {"ttft": 150}).good_requests == 1  # A only
    assert compute_metrics([A, B, C], 2.0, {"ttft": 200}).good_requests == 2  # <= is met
    both = compute_metrics([A, B, C], 2.0, {"ttft": 250, "tpot": 50})
    assert both.good_requests == 1  # A's TPOT is 66.7 ms; B's counts as 0
    assert both.request_goodput == pytest.approx(0.5)
    assert both.slo_attainment == pytest.approx(1 / 3)
    e2e = compute_metrics([A, B, C], 2.0, {"e2el": 250})
    assert e2e.good_requests == 1  # B (200 ms); A took 300 ms


def test_peak_tokens_per_second_and_concurrency() -> None:
    late = RequestOutcome(
        success=True,
        prompt_len=1,
        output_tokens=2,
        ttft_s=1.0,
        itl_s=(0.1,),
        latency_s=1.1,
        start_s=0.2,
    )
    m = compute_metrics([A, B, late], duration_s=2.0)
    # A's 4 tokens and B's 1 fall in second 0 (t < 1); late's 2 tokens at 1.2 and 1.3.
    assert m.max_output_tokens_per_s == 5.0
    # A [0, 0.3), late [0.2, 1.3), B [0.5, 0.7): at most two at once.
    assert m.max_concurrent_requests == 2


def test_every_failed_gives_zeros_not_errors() -> None:
    m = compute_metrics([C], duration_s=1.0)
    assert m.completed == 0 and m.completion_rate == 0.0
    assert m.ttft.mean_ms == 0.0 and m.itl.percentiles_ms[99.0] == 0.0
    assert m.max_output_tokens_per_s == 0.0 and m.max_concurrent_requests == 0


def test_as_dict_uses_vllm_names() -> None:
    d = compute_metrics([A, B], 1.0, {"ttft": 500}, percentiles=(50.0, 99.9)).as_dict()
    for key in ("mean_ttft_ms", "median_tpot_ms", "std_itl_ms", "p99.9_e2el_ms", "p50_itl_ms"):
        assert key in d
    assert d["request_goodput"] == pytest.approx(2.0)
    assert d["completion_rate"] == 1.0


def test_parse_goodput() -> None:
    assert parse_goodput(["ttft:500", "tpot:100", "e2el:2000.5"]) == {
        "ttft": 500.0,
        "tpot": 100.0,
        "e2el": 2000.5,
    }
    for bad in ("ttft=500", "itl:5", "ttft:fast", "tpot:-1"):
        with pytest.raises(ValueError):
            parse_goodput([bad])


def test_duration_must_be_positive() -> None:
    with pytest.raises(ValueError):
        compute_metrics([A], duration_s=0.0)
