"""``scripts/gpu_check.sh`` and ``benchmarks/gpu_check.py`` on a CPU machine: the dry run lists
every step (the CUDA ones marked skipped) and exits 0, the benchmark imports and plans without
CUDA, and its sections' logic runs on a tiny model on CPU (no figures are asserted)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ("gpu", "install", "protos", "versions", "imports", "pytest", "bench")
CUDA_STEPS = ("gpu", "pytest", "bench")


def _bash(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_dry_run_lists_every_step_and_skips_the_cuda_ones():
    done = _bash("--dry-run", env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith("step ")}
    assert tuple(lines) == STEPS
    for name in CUDA_STEPS:
        assert "CUDA step, skipped in a dry run" in lines[name]
    for name in set(STEPS) - set(CUDA_STEPS):
        assert "skipped" not in lines[name]
    assert "--no-index --no-deps" in lines["install"] and ".whl/*.whl" in lines["install"]
    assert "pytest tests/gpu" in lines["pytest"]
    assert "benchmarks/gpu_check.py" in lines["bench"]
    # the benchmark's own plan follows, one line a section
    planned = [line for line in done.stdout.splitlines() if line.startswith("bench section ")]
    assert [line.split()[2].rstrip(":") for line in planned] == [n for n, _ in gpu_check.SECTIONS]


def test_unknown_argument_is_refused():
    done = _bash("--bogus")
    assert done.returncode == 2
    assert "unknown argument" in done.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine runs it all")
def test_a_real_run_without_cuda_stops_at_once(tmp_path: Path):
    done = _bash(env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 3
    assert "no CUDA device" in (tmp_path / "summary.txt").read_text()


def test_only_runs_the_named_steps_with_logs_under_out(tmp_path: Path):
    """A non-CUDA step alone runs anywhere: its output lands in the log, a line a step in the
    summary."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = _bash("--only", "versions", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("versions: ok in ")
    assert summary[-1].startswith("total: ")
    log = (tmp_path / "gpu_check.log").read_text()
    assert "===== step versions" in log and '"varlen_attn"' in log


def test_a_step_past_the_budget_is_skipped(tmp_path: Path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = _bash("--only", "versions", env={**env, "GPU_CHECK_BUDGET_S": "5"})
    assert done.returncode == 1
    assert "versions: skipped (time" in (tmp_path / "summary.txt").read_text()


def test_dry_run_with_only_lists_those_steps():
    done = _bash("--dry-run", "--only", "install,bench")
    assert done.returncode == 0
    assert [line.split()[1] for line in done.stdout.splitlines() if line.startswith("step ")] == [
        "install",
        "bench",
    ]


def test_benchmark_dry_run_and_help(capsys: pytest.CaptureFixture[str]):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("section ") == len(gpu_check.SECTIONS)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--help"])
    assert exit_info.value.code == 0
    assert gpu_check.main(["--sections", "nope", "--dry-run"]) == 2


def test_benchmark_as_a_script_needs_no_cuda_to_plan():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "section identity" in done.stdout


def test_capabilities_report_versions_and_varlen_support():
    info = gpu_check.capabilities()
    for key in ("python", "torch", "torch_cuda", "cuda_available", "transformers", "varlen_attn"):
        assert key in info
    if info["varlen_attn"]:
        assert isinstance(info["varlen_block_table"], bool)
    name = gpu_check.engine_has_graphs_setting()
    assert name is None or "graph" in name


def test_sections_run_on_a_tiny_model_on_cpu(tmp_path: Path):
    """The sections' engine plumbing (no figures): float32 greedy identity, seeded sampling,
    and the rows CPU cannot fill say why."""
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--shapes", "tiny", "--out", str(out), "--models", str(tmp_path)]
    argv += ["--sections", "identity,sampled,kv_copy,graphs,serving"]
    gpu_check.main(argv)  # bfloat16 on CPU may differ from transformers: not asserted
    table = (out / "table.md").read_text()
    assert "| greedy identity | tiny float32 | identical |" in table
    assert "| sampled | 8 requests, 4 seeds | ok |" in table
    assert "needs CUDA" in table
    assert "colocated / disaggregated" in table
    # graphs on vs off, side by side; off CUDA no bucket is ever captured
    assert "| CUDA graphs on | tiny bf16 B=1 C=256 |" in table
    assert "| CUDA graphs off | tiny bf16 B=16 C=256 |" in table
    assert "| CUDA graphs speedup | tiny bf16 B=1 C=256 |" in table
    assert "graphs 1" not in table and "eager" in table
