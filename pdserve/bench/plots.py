"""PNG plots of benchmark runs: latency percentiles vs rate, ITL distribution, throughput.

Uses matplotlib's non-interactive Agg backend (no display needed). Request rates are placed on
a categorical axis in the order they were run, so ``inf`` sits naturally at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pdserve.bench.report import LATENCY_METRICS, RunResult

_STYLES = ("-", "--", ":")


def _rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _rates(runs: Sequence[RunResult]) -> list[float]:
    seen: list[float] = []
    for r in runs:
        if r.load.request_rate not in seen:
            seen.append(r.load.request_rate)
    return seen


def _labels(runs: Sequence[RunResult]) -> list[str]:
    return list(dict.fromkeys(r.label for r in runs))


def write_plots(runs: Sequence[RunResult], out_dir: Path) -> list[Path]:
    """Write the three plots into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _latency_vs_rate(runs, out_dir / "latency_vs_rate.png"),
        _itl_distribution(runs, out_dir / "itl_distribution.png"),
        _throughput(runs, out_dir / "throughput.png"),
    ]


def _latency_vs_rate(runs: Sequence[RunResult], path: Path) -> Path:
    import matplotlib.pyplot as plt

    rates = _rates(runs)
    x = {rate: i for i, rate in enumerate(rates)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for ax, (key, name) in zip(axes.flat, LATENCY_METRICS, strict=True):
        for color, label in enumerate(_labels(runs)):
            mine = [r for r in runs if r.label == label]
            percentiles = list(getattr(mine[0].metrics, key).percentiles_ms)
            for style, p in zip(_STYLES, percentiles[-3:], strict=False):
                ax.plot(
                    [x[r.load.request_rate] for r in mine],
                    [getattr(r.metrics, key).percentiles_ms[p] for r in mine],
                    linestyle=style,
                    marker="o",
                    color=f"C{color}",
                    label=f"{label} p{p:g}",
                )
        ax.set_title(f"{name} percentiles")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_xticks(range(len(rates)), [_rate_label(r) for r in rates])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _itl_distribution(runs: Sequence[RunResult], path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in runs:
        gaps = np.sort([g * 1000 for o in r.outcomes if o.success for g in o.itl_s])
        if not len(gaps):
            continue
        share = np.arange(1, len(gaps) + 1) / len(gaps)
        ax.step(gaps, share, where="post", label=f"{r.label} @ {_rate_label(r.load.request_rate)}")
    ax.set_xscale("log")
    ax.set_xlabel("inter-token latency (ms, log scale)")
    ax.set_ylabel("fraction of gaps <= x")
    ax.set_title("ITL distribution (empirical CDF)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _throughput(runs: Sequence[RunResult], path: Path) -> Path:
    import matplotlib.pyplot as plt

    rates = _rates(runs)
    labels = _labels(runs)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        mine = {r.load.request_rate: r.metrics.output_throughput for r in runs if r.label == label}
        xs = [
            j + (i - (len(labels) - 1) / 2) * width for j, rate in enumerate(rates) if rate in mine
        ]
        ys = [mine[rate] for rate in rates if rate in mine]
        bars = ax.bar(xs, ys, width=width, label=label, color=f"C{i}")
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(rates)), [_rate_label(r) for r in rates])
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Output token throughput")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
