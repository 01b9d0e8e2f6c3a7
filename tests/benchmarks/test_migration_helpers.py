"""``benchmarks/migration.py`` without a server: seeded prompts, the pause (largest gap after the
event), token comparison, the gateway's counters and their deltas, the path check of each mode,
the per-context rows, the table and the issue's targets."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.migration import (
    TOKEN_RANGE,
    deltas,
    first_difference,
    largest_gap,
    logged_number,
    metric_values,
    parse_contexts,
    path_problem,
    prompt_ids,
    summarize,
    table,
    targets,
)

EXPOSITION = """\
# HELP pdserve_migrations_total Streams a draining decode worker offered
# TYPE pdserve_migrations_total counter
pdserve_migrations_total{outcome="migrated",tier="gateway"} 2.0
pdserve_migrations_created{outcome="migrated",tier="gateway"} 1.7e9
# TYPE pdserve_decode_resumes_total counter
pdserve_decode_resumes_total{outcome="resumed",tier="gateway"} 1.0
# TYPE pdserve_migration_pause_seconds histogram
pdserve_migration_pause_seconds_bucket{le="0.1",tier="gateway"} 1.0
pdserve_migration_pause_seconds_bucket{le="+Inf",tier="gateway"} 2.0
pdserve_migration_pause_seconds_count{tier="gateway"} 2.0
pdserve_migration_pause_seconds_sum{tier="gateway"} 0.3
# TYPE pdserve_requests_total counter
pdserve_requests_total{code="OK",tier="gateway"} 9.0
"""


def test_prompts_are_seeded_of_their_length_and_ordinary_ids() -> None:
    assert prompt_ids(512, 0) == prompt_ids(512, 0)
    assert prompt_ids(512, 0) != prompt_ids(512, 1)
    assert prompt_ids(2048, 0)[:512] != prompt_ids(512, 0)  # no shared prefix to cache
    assert len(prompt_ids(4096, 3)) == 4096
    assert all(TOKEN_RANGE[0] <= t < TOKEN_RANGE[1] for t in prompt_ids(2048, 0))


def test_the_pause_is_the_largest_gap_ending_after_the_event() -> None:
    arrivals = [0.0, 0.1, 0.2, 1.5, 1.6, 1.65]
    assert largest_gap(arrivals) == pytest.approx(1.3)
    assert largest_gap(arrivals, after=0.25) == pytest.approx(1.3)  # the gap spanning it
    assert largest_gap([0.0, 0.9, 1.0, 1.2], after=0.95) == pytest.approx(0.2)  # earlier left out
    assert largest_gap([0.0, 0.1], after=0.5) is None
    assert largest_gap([0.0]) is None


def test_first_difference() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_counters_sum_over_tiers_keep_outcome_and_delta_moved_ones_only() -> None:
    twice = EXPOSITION + EXPOSITION.replace('"gateway"', '"other"')
    values = metric_values(twice)
    assert values == {
        "pdserve_migrations_total{migrated}": 4.0,
        "pdserve_decode_resumes_total{resumed}": 2.0,
        "pdserve_migration_pause_seconds_count": 4.0,
        "pdserve_migration_pause_seconds_sum": pytest.approx(0.6),
    }
    moved = deltas(metric_values(EXPOSITION), values)
    assert moved["pdserve_migrations_total{migrated}"] == 2.0
    assert deltas(values, values) == {}
    assert deltas({}, {"x{failed}": 1.0}) == {"x{failed}": 1.0}


def test_each_mode_must_take_its_own_path() -> None:
    migrated = {"pdserve_migrations_total{migrated}": 1.0}
    resumed = {"pdserve_decode_resumes_total{resumed}": 1.0}
    fell_back = {"pdserve_migrations_total{failed}": 1.0, **resumed}
    assert path_problem("migration", migrated) is None
    assert path_problem("re-prefill", resumed) is None
    assert path_problem("migration", fell_back) is not None
    assert path_problem("migration", {}) is not None
    assert path_problem("re-prefill", {**resumed, **migrated}) is not None
    histogram = {"pdserve_migration_pause_seconds_sum": 0.2}  # no outcome: not a path
    assert path_problem("migration", {**migrated, **histogram}) is None


def test_logged_number_takes_the_last_numeric_field() -> None:
    lines = [{"bytes": 10}, {"bytes": 20, "pause_ms": 3.5}, {"event": "x"}]
    assert logged_number(lines, "bytes") == 20.0
    assert logged_number(lines, "pause_ms") == 3.5
    assert logged_number([{"bytes": True}], "bytes") is None
    assert logged_number([], "bytes") is None


def _case(mode: str, context: int, pause: float, **more: object) -> dict[str, object]:
    base = {
        "mode": mode,
        "context": context,
        "pause_s": pause,
        "kv_bytes": 2.0**20 * 6 if mode == "migration" else None,
        "gateway_pause_ms": 80.0 if mode == "migration" else None,
        "histogram_pause_s": 0.08 if mode == "migration" else None,
        "undisturbed_gap_s": 0.05,
        "ttft_s": 1.25,
        "identical": True,
        "path_problem": None,
    }
    return {**base, **more}


def test_rows_pair_the_modes_per_context_and_the_targets_read_2048() -> None:
    cases = [
        _case("migration", 2048, 0.1),
        _case("migration", 2048, 0.3),
        _case("migration", 2048, 0.2),
        _case("re-prefill", 2048, 1.0),
        _case("migration", 512, 0.05),
        _case("re-prefill", 512, 0.1, identical=False),
    ]
    rows = summarize(cases)
    assert [r["context"] for r in rows] == [512, 2048]
    row = rows[1]
    assert row["migration_pause_s"] == pytest.approx(0.2)  # the median
    assert row["ratio"] == pytest.approx(0.2)
    assert row["events"] == {"migration": 3, "re-prefill": 1}
    assert row["identical"] and not rows[0]["identical"]
    goal = targets(rows)
    assert goal["ratio_ok"] and goal["pause_ok"]
    assert targets(rows[:1])["ratio_ok"] is None
    text = table(rows)
    assert (
        "| 2048 | 0.200 | 1.000 | 0.200 | 6.0 | 80.0 | 0.080 | 0.050 | 1.25 | identical |" in text
    )
    assert "MISMATCH" in text.splitlines()[2]


def test_a_missed_target_and_a_missing_mode() -> None:
    rows = summarize([_case("migration", 2048, 0.6), _case("re-prefill", 2048, 1.0)])
    goal = targets(rows)
    assert goal["ratio_ok"] is False and goal["pause_ok"] is False
    alone = summarize([_case("migration", 4096, 0.6)])
    assert alone[0]["ratio"] is None and "n/a" in table(alone)


def test_contexts_parse() -> None:
    assert parse_contexts("512, 2048,4096") == [512, 2048, 4096]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_contexts("0")
