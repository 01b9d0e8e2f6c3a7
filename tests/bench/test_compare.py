"""``--compare``'s systems without a model: parsing ``--systems``, the peer's flags, and the
ratios against the peer."""

from __future__ import annotations

import math

import pytest

from pdserve.bench.compare import DEFAULT_SYSTEMS, System, parse_systems, throughput_ratios
from pdserve.bench.load import LoadSpec
from pdserve.bench.metrics import RequestOutcome, compute_metrics
from pdserve.bench.report import RunResult
from pdserve.cli import build_parser


def test_systems_in_the_order_given_and_the_peer_only_when_named() -> None:
    assert parse_systems(None) == parse_systems(" , ") == DEFAULT_SYSTEMS
    assert System.VLLM_CPU not in DEFAULT_SYSTEMS and System.VLLM_CPU.peer
    assert not System.VLLM_CPU.in_process and not System.COLOCATED.peer
    assert parse_systems("vllm-cpu, pdserve-colocated") == (System.VLLM_CPU, System.COLOCATED)
    with pytest.raises(ValueError, match=r"unknown vllm \(choose from .*vllm-cpu\)"):
        parse_systems("hf-cb,vllm")
    with pytest.raises(ValueError, match="twice"):
        parse_systems("vllm-cpu,vllm-cpu")


def test_the_peer_flags() -> None:
    args = build_parser().parse_args(
        ["bench", "--compare", "--systems", "vllm-cpu", "--peer-url", "http://127.0.0.1:8000"]
    )
    assert (args.systems, args.peer_url, args.peer_script) == (
        "vllm-cpu",
        "http://127.0.0.1:8000",
        None,
    )
    assert build_parser().parse_args(["bench", "--peer-script", "p.sh"]).peer_script.name == "p.sh"


def _run(label: str, tokens_per_s: float) -> RunResult:
    outcomes = [RequestOutcome(True, 4, int(tokens_per_s), 0.1, (), 0.5)]
    return RunResult(label, label, LoadSpec(math.inf), compute_metrics(outcomes, 1.0, {}), outcomes)


def test_pdserve_is_measured_against_the_peer() -> None:
    runs = [_run("hf-serial", 10), _run("pdserve-colocated", 40), _run("vllm-cpu", 50)]
    assert throughput_ratios(runs) == {
        "pdserve-colocated": {"hf-serial": 4.0, "vllm-cpu": 0.8},
    }
