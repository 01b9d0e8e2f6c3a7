"""tests/gpu runs only where CUDA is: without it every test in this folder is skipped (CI's CPU
machines report skips, never errors). Run them on a GPU with ``scripts/gpu_check.sh``, or
``pytest tests/gpu`` there. Nothing here touches CUDA at import time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_check.sh on a lent GPU)")
    for item in items:
        if item.path.resolve().is_relative_to(HERE):
            item.add_marker(skip)
