"""Reading a pdserve process's /metrics in end-to-end tests."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample at ``http://127.0.0.1:port/metrics``, keyed by name and its labels other
    than ``tier`` (sorted)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "tier"))
            values[(sample.name, labels)] = sample.value
    return values


def sample(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the process has not reported it (a counter never touched)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
