"""What a benchmark run leaves behind: a table on stdout, a JSON file, PNG plots."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdserve.bench.load import LoadSpec
from pdserve.bench.metrics import BenchMetrics, LatencyStats, RequestOutcome, percentile_key

LATENCY_METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E"))


@dataclass(frozen=True)
class RunResult:
    """One system at one load: its metrics and every request's outcome."""

    label: str
    description: str
    load: LoadSpec
    metrics: BenchMetrics
    outcomes: Sequence[RequestOutcome] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        done = [o for o in self.outcomes if o.success]
        return {
            "label": self.label,
            "description": self.description,
            "request_rate": _rate_json(self.load.request_rate),
            "burstiness": self.load.burstiness,
            "max_concurrency": self.load.max_concurrency,
            **self.metrics.as_dict(),
            "input_lens": [o.prompt_len for o in self.outcomes],
            "output_lens": [o.output_tokens for o in self.outcomes],
            "ttfts": [o.ttft_s for o in done],
            "itls": [list(o.itl_s) for o in done],
            "errors": [o.error for o in self.outcomes if not o.success],
        }


def _rate_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _rate_text(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def format_table(runs: Sequence[RunResult]) -> str:
    """Throughput per run, then latency percentiles per run, as aligned text."""
    if not runs:
        return "no runs"
    goodput = any(r.metrics.request_goodput is not None for r in runs)
    head = ["system", "rate", "conc", "done", "dur s", "req/s", "out tok/s", "tot tok/s"]
    if goodput:
        head += ["goodput", "SLO met"]
    rows = []
    for r in runs:
        m = r.metrics
        row = [
            r.label,
            _rate_text(r.load.request_rate),
            str(r.load.max_concurrency or "-"),
            f"{m.completed}/{m.num_requests}",
            f"{m.duration_s:.2f}",
            f"{m.request_throughput:.2f}",
            f"{m.output_throughput:.1f}",
            f"{m.total_token_throughput:.1f}",
        ]
        if goodput:
            attained = m.slo_attainment
            row += [
                "-" if m.request_goodput is None else f"{m.request_goodput:.2f}",
                "-" if attained is None else f"{attained:.0%}",
            ]
        rows.append(row)
    percentiles = list(runs[0].metrics.ttft.percentiles_ms)
    lat_head = ["system", "rate", "metric (ms)", "mean", *(percentile_key(p) for p in percentiles)]
    lat_rows = []
    for r in runs:
        for key, name in LATENCY_METRICS:
            stats: LatencyStats = getattr(r.metrics, key)
            values = [stats.mean_ms, *(stats.percentiles_ms[p] for p in percentiles)]
            lat_rows.append(
                [r.label, _rate_text(r.load.request_rate), name, *(f"{v:.1f}" for v in values)]
            )
    return _align(head, rows) + "\n\n" + _align(lat_head, lat_rows)


def _align(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        return "  ".join(
            [f"{first:<{widths[0]}}", *(f"{c:>{w}}" for c, w in zip(rest, widths[1:], strict=True))]
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule, *(line(r) for r in rows)])


def format_ratios(ratios: Mapping[str, Mapping[str, float]]) -> str:
    """``pdserve-x output tok/s = 5.10x hf-serial, 2.30x hf-static8`` lines."""
    lines = []
    for system, against in ratios.items():
        parts = ", ".join(f"{ratio:.2f}x {base}" for base, ratio in against.items())
        lines.append(f"{system} output tok/s = {parts}")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def write_json(
    path: Path,
    runs: Sequence[RunResult],
    config: Mapping[str, Any],
    ratios: Mapping[str, Mapping[str, float]] | None = None,
) -> None:
    doc = {
        "config": dict(config),
        "machine": machine_info(),
        "runs": [r.to_json() for r in runs],
        "ratios": dict(ratios or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
