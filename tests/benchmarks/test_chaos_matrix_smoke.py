"""``benchmarks/chaos_matrix.py`` runs two cells on a real cluster (a tiny model, 2 prefill + 2
decode workers, 4 shorter requests): a decode worker SIGSTOPped mid-decode (the gateway resumes
its streams elsewhere, SIGCONT brings it back) and a prefill worker SIGKILLed mid-prefill (the
last cell, so no restore). Every request of both cells must finish token-identical, every live
pool end idle, the fleet serve again, and the JSON report say so; the table has a row per cell.
About 30 s, most of it starting the cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.chaos_matrix import main

pytestmark = pytest.mark.e2e

CELLS = ("stop:decode:mid-decode", "kill:prefill:mid-prefill")


def test_two_cells_lose_nothing_and_leak_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "matrix.json"
    argv = ["--cells", ",".join(CELLS), "--requests", "4"]
    argv += ["--prompt-len", "600", "--max-tokens", "48", "--json", str(out)]
    status = main(argv)
    report = json.loads(out.read_text())
    assert report["findings"] == [], report["findings"]
    assert status == 0
    assert [c["cell"] for c in report["cells"]] == list(CELLS)
    for cell in report["cells"]:
        assert cell["reached"], cell
        assert cell["victim"].startswith(cell["tier"] + "-"), cell
        assert cell["counts"] == {"identical": 4}, cell
        assert cell["hit"] >= 1, "the fault hit no request: nothing was tested"
        assert cell["leaked_blocks"] == 0 and cell["not_idle"] == [], cell["pools"]
        assert cell["serving_again_s"] is not None and cell["serving_again_s"] > 0, cell
        assert len(cell["pools"]) == (4 if cell["fault"] == "stop" else 3)  # all live workers
        assert all(r["outcome"] == "identical" and r["tokens"] == 48 for r in cell["requests"])
    table = capsys.readouterr().out
    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| stop") or line.startswith("| kill")
    ]
    assert len(rows) == len(CELLS), table
