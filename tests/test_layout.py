"""The package layout DESIGN.md describes, checked: import contracts, torch-free entry points,
modules of a readable size."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "protos",
    "core",
    "engine",
    "kvtransfer",
    "server_runtime",
    "gateway",
    "prefill_service",
    "decode_service",
    "pdserve",
    "deploy",
)
MAX_MODULE_LINES = 400


def test_import_contracts_hold() -> None:
    """pyproject.toml's [tool.importlinter] contracts: layers point down, no torch in the
    gateway, the SDK or the core."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a dev dependency: run make setup-dev"
    done = subprocess.run(
        [lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("pdserve.cli", ("torch",)),
        ("gateway.server", ("torch",)),
        ("pdserve.client", ("torch", "transformers", "engine", "server_runtime")),
    ],
)
def test_entry_points_import_without_torch(module: str, forbidden: tuple[str, ...]) -> None:
    """What the gateway process and a client import at start loads no libtorch (the CLI
    imports a tier's server only once that tier's command runs)."""
    code = f"import sys, {module}; print(sorted(m for m in {forbidden!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]", f"{module} imports {done.stdout.strip()}"


def test_no_hand_written_module_is_past_the_size_limit() -> None:
    long = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            lines = len(path.read_text().splitlines())
            if lines > MAX_MODULE_LINES:
                long.append(f"{path.relative_to(ROOT)}: {lines}")
    assert not long, f"split along a concept (over {MAX_MODULE_LINES} lines): {long}"
