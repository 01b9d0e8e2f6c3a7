"""``benchmarks/structured_output.py --quick`` runs end to end on the default model and reports
every figure. No timing is asserted: the figures only have to exist and be sane."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ModelConfig
from engine.model_files import default_cache_dir, default_model_dir, is_converted

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not is_converted(default_model_dir(ModelConfig(cache_dir=default_cache_dir()))),
        reason="default model not converted",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "structured_output.py"


def test_quick_run_reports_both_modes_and_the_mask(tmp_path: Path) -> None:
    out = tmp_path / "structured_output.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    for mode in ("unconstrained", "constrained", "mask_alone"):
        for unit in ("ms_per_step", "ms_per_token"):
            value = data[mode][unit]
            assert math.isfinite(value) and value > 0, (mode, unit, value)
    assert math.isfinite(data["added"]["percent"])
    assert data["sample"].startswith('{"items": [')  # the constrained output follows the schema
    for heading in ("unconstrained", "constrained", "mask_alone", "added"):
        assert heading in proc.stdout
