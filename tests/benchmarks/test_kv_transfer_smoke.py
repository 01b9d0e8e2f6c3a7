"""``benchmarks/kv_transfer.py --smoke`` runs end to end as a user runs it and reports every
figure of issue 3's benchmark. No timing is asserted: the figures only have to exist and be
sane (positive, finite where a ratio is defined)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "kv_transfer.py"
BACKENDS = ("zmq-tcp", "zmq-ipc", "stream-tcp", "stream-ipc", "gloo")
AUTH_MODES = ("gmac", "xxh3", "none")


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    out = tmp_path_factory.mktemp("kv-bench") / "kv_transfer.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text()), proc.stdout


def test_machine_and_tables_are_reported(smoke: tuple[dict[str, Any], str]) -> None:
    data, stdout = smoke
    assert data["machine"]["nproc"] >= 1
    assert data["machine"]["cpu_model"]
    assert data["profile"] == "smoke"
    for heading in ("machine: nproc=", "1. Goodput", "2. Exposed", "3. TTFT", "Targets"):
        assert heading in stdout


def test_goodput_of_every_backend_and_baseline(smoke: tuple[dict[str, Any], str]) -> None:
    data, _ = smoke
    sizes = data["config"]["sizes"]
    goodput = data["goodput"]
    tagged = [f"raw-{t}+{a}" for t in ("tcp", "ipc") for a in ("gmac", "xxh3")]
    for name in ("memcpy", "raw-tcp", "raw-ipc", "raw-tcp+copy", "raw-ipc+copy", *tagged):
        for tokens in sizes:
            assert _positive(goodput["baselines"][name][str(tokens)]["gbps"]["median"]), name
    cells = {(c["backend"], c["auth"], c["tokens"]): c for c in goodput["cells"]}
    assert len(cells) == len(BACKENDS) * len(AUTH_MODES) * len(sizes)
    for backend in BACKENDS:
        for auth in AUTH_MODES:
            for tokens in sizes:
                cell = cells[(backend, auth, tokens)]
                for key in ("ratio_raw", "ratio_memcpy", "ready_ratio_raw"):
                    assert _positive(cell[key]), (backend, auth, tokens, key)
                assert _positive(cell["acked_gbps"]["median"])
                assert _positive(cell["ready_gbps"]["median"])
                assert cell["bytes"] == tokens * data["config"]["bytes_per_token"]
                assert not cell["receiver_stats"]["failures"], cell["receiver_stats"]


def test_exposed_transfer_time_of_both_modes(smoke: tuple[dict[str, Any], str]) -> None:
    data, _ = smoke
    exposed = data["exposed"]
    rows = {(r["tokens"], r["mode"]): r for r in exposed["rows"]}
    for tokens in data["config"]["sizes"]:
        for mode in ("layerwise", "after-prefill"):
            row = rows[(tokens, mode)]
            assert _positive(row["exposed_s"]["median"]), row  # ready after compute ends
            assert _positive(row["compute_s"]["median"]), row
        assert _positive(exposed["ratio_layerwise_to_after"][str(tokens)])


def test_ttft_and_second_token_disaggregated_and_colocated(
    smoke: tuple[dict[str, Any], str],
) -> None:
    data, _ = smoke
    serving = data["serving"]
    rows = {(r["mode"], r["tokens"]): r for r in serving["rows"]}
    for tokens in data["config"]["sizes"]:
        for mode in ("colocated", "disaggregated"):
            row = rows[(mode, tokens)]
            assert _positive(row["ttft_s"]["median"]), row
            assert row["t2t_s"]["median"] >= row["ttft_s"]["median"], row
        for key in (f"ttft_{tokens}", f"t2t_{tokens}"):
            assert _positive(serving["ratios_to_colocated"]["disaggregated"][key])


def test_every_target_is_judged(smoke: tuple[dict[str, Any], str]) -> None:
    data, stdout = smoke
    names = [t["name"] for t in data["targets"]]
    assert any("goodput / raw pyzmq" in n for n in names)
    assert any("exposed transfer time" in n for n in names)
    assert any("time-to-second-token" in n for n in names)
    for target in data["targets"]:
        assert isinstance(target["pass"], bool)
        assert f"[{'PASS' if target['pass'] else 'MISS'}] {target['name']}" in stdout
