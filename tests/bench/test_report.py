"""The table, the JSON file (strict JSON, every metric) and the PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pdserve.bench.load import LoadSpec
from pdserve.bench.metrics import RequestOutcome, compute_metrics
from pdserve.bench.plots import write_plots
from pdserve.bench.report import RunResult, format_ratios, format_table, write_json


def _run(label: str, rate: float, scale: float) -> RunResult:
    outcomes = [
        RequestOutcome(
            success=True,
            prompt_len=8,
            output_tokens=3,
            ttft_s=0.1 * scale,
            itl_s=(0.02 * scale, 0.03 * scale),
            latency_s=0.15 * scale,
            start_s=0.01 * i,
        )
        for i in range(4)
    ]
    metrics = compute_metrics(outcomes, 1.0 * scale, {"ttft": 150})
    return RunResult(label, f"{label} system", LoadSpec(rate), metrics, outcomes)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"not strict JSON: {name}")


def test_table_json_and_plots(tmp_path: Path) -> None:
    runs = [
        _run(label, rate, s) for label, s in (("a", 1.0), ("b", 2.0)) for rate in (1.0, math.inf)
    ]
    table = format_table(runs)
    assert "out tok/s" in table and "goodput" in table and "TTFT" in table and "p99" in table
    assert table.count("\n") > 8
    ratios = {"b": {"a": 0.5}}
    assert format_ratios(ratios) == "b output tok/s = 0.50x a"

    path = tmp_path / "out" / "result.json"
    write_json(path, runs, {"request_rate": "inf"}, ratios)
    doc = json.loads(path.read_text(), parse_constant=_refuse_constant)
    assert [r["request_rate"] for r in doc["runs"]] == [1.0, "inf", 1.0, "inf"]
    first = doc["runs"][0]
    assert first["completion_rate"] == 1.0 and first["completed"] == 4
    assert first["p99_itl_ms"] > 0 and first["request_goodput"] == 4.0
    assert len(first["itls"]) == 4 and first["errors"] == []
    assert doc["ratios"] == ratios and doc["machine"]["cpu_count"] >= 1

    pngs = write_plots(runs, tmp_path / "plots")
    assert [p.name for p in pngs] == [
        "latency_vs_rate.png",
        "itl_distribution.png",
        "throughput.png",
    ]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
