"""The vLLM peer of ``pdserve bench --compare`` without vLLM: its flags, and its lifecycle and
requests against fake_peer.sh, a script with the real one's contract that starts a real HTTP
server process streaming OpenAI-style SSE."""

from __future__ import annotations

import json
import math
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pdserve.bench.compare import CompareConfig, System, run_compare
from pdserve.bench.datasets import BenchRequest
from pdserve.bench.load import LoadSpec
from pdserve.bench.peer import (
    PEER_MODEL,
    PeerConfig,
    default_peer_script,
    peer_base_url,
    running_peer,
)
from pdserve.bench.runner import RunSettings

FAKE_PEER = Path(__file__).with_name("fake_peer.sh")
REQUESTS = [BenchRequest(tuple(range(1, 4 + i)), 4 + i) for i in range(4)]
SETTINGS = RunSettings(slos_ms={"ttft": 5000.0}, timeout_s=30, disable_progress=True)


@pytest.fixture(autouse=True)
def _fake_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_PEER_PYTHON", sys.executable)


def _answers(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=2):
            return True
    except OSError:
        return False


def _bodies(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "bodies.jsonl").read_text().splitlines()]


# -- the flags ----------------------------------------------------------------------------------


def test_a_url_wins_and_is_taken_up_to_v1(tmp_path: Path) -> None:
    assert PeerConfig.resolve(None, "http://127.0.0.1:8000/") == PeerConfig(
        url="http://127.0.0.1:8000/v1"
    )
    assert peer_base_url("http://h:1/v1/") == "http://h:1/v1"
    with pytest.raises(ValueError, match="peer-url"):
        peer_base_url("127.0.0.1:8000")
    assert PeerConfig.resolve(FAKE_PEER, None) == PeerConfig(script=FAKE_PEER)
    with pytest.raises(ValueError, match="no such file"):
        PeerConfig.resolve(tmp_path / "missing.sh", None)


def test_the_default_script_lies_beside_the_repository() -> None:
    script = default_peer_script()
    repo = Path(__file__).resolve().parents[2]
    assert script is None or script == repo.parent / "shared" / "peers" / "vllm-cpu.sh"


# -- the lifecycle ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_started_on_a_free_port_and_stopped_after(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    peer_cfg = PeerConfig(script=FAKE_PEER)
    with running_peer(peer_cfg, model, tmp_path / "logs", "bfloat16") as peer:
        run_dir = tmp_path / "logs" / "vllm-cpu"
        assert peer.base_url.startswith("http://127.0.0.1:") and peer.base_url.endswith("/v1")
        assert peer.model == PEER_MODEL and "fake_peer.sh" in peer.description
        assert _answers(peer.base_url)
        assert (run_dir / "model").read_text() == f"{model} bfloat16"  # the clusters' dtype
    assert not _answers(peer.base_url)
    calls = (run_dir / "calls").read_text().splitlines()
    assert calls[0].startswith(f"start {model} ") and calls[-1] == "stop"
    assert not (run_dir / "pid").exists()


@pytest.mark.e2e
def test_a_failed_start_is_an_error_and_still_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_PEER_FAIL", "1")
    with (
        pytest.raises(RuntimeError, match=r"start exited 1:\n(.|\n)*refusing to serve"),
        running_peer(PeerConfig(script=FAKE_PEER), tmp_path, tmp_path / "logs"),
    ):
        pytest.fail("the body must not run")
    calls = (tmp_path / "logs" / "vllm-cpu" / "calls").read_text().splitlines()
    assert calls[-1] == "stop"


def test_a_given_url_is_neither_started_nor_stopped(tmp_path: Path) -> None:
    cfg = PeerConfig(url="http://127.0.0.1:9/v1")
    with running_peer(cfg, tmp_path, tmp_path / "logs") as peer:
        assert peer.base_url == cfg.url and peer.model is None
    assert not (tmp_path / "logs").exists()


# -- a compare run ------------------------------------------------------------------------------


@pytest.mark.e2e
def test_compare_runs_the_peer_on_the_same_token_ids(tmp_path: Path) -> None:
    cfg = CompareConfig(
        model_path=tmp_path,
        log_dir=tmp_path / "logs",
        systems=(System.VLLM_CPU,),
        peer=PeerConfig(script=FAKE_PEER),
    )
    (run,) = run_compare(REQUESTS, LoadSpec(math.inf, max_concurrency=2), SETTINGS, cfg)
    assert run.label == "vllm-cpu" and "(model peer, SSE)" in run.description
    assert run.metrics.completed == len(REQUESTS) and run.metrics.request_goodput is not None
    # every token counted, the textless (held-back) chunks' too, and their gaps spread
    for request, outcome in zip(REQUESTS, run.outcomes, strict=True):
        assert outcome.output_tokens == request.output_len
        assert outcome.prompt_len == request.prompt_len
        assert len(outcome.itl_s) == request.output_len - 1
    bodies = _bodies(tmp_path / "logs" / "vllm-cpu")
    assert len(bodies) == 1 + len(REQUESTS)  # the warm-up first
    measured = sorted(bodies[1:], key=lambda b: len(b["prompt"]))
    assert [b["prompt"] for b in measured] == [list(r.prompt_token_ids) for r in REQUESTS]
    for body, request in zip(measured, REQUESTS, strict=True):
        assert body["model"] == PEER_MODEL and body["max_tokens"] == request.output_len
        assert body["ignore_eos"] is True and body["temperature"] == 0.0
        assert body["stream"] is True
        assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert not os.path.exists(tmp_path / "logs" / "vllm-cpu" / "pid")  # stopped after its run
