"""forbid_torch keeps torch out of a process, and refuses to run once it is too late."""

from __future__ import annotations

import subprocess
import sys

import pytest

from server_runtime.torch_guard import TorchAlreadyLoadedError, forbid_torch


def _child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_import_torch_fails_after_the_guard() -> None:
    done = _child(
        "from server_runtime.torch_guard import forbid_torch\n"
        "forbid_torch()\n"
        "try:\n    import torch\nexcept ImportError:\n    print('refused')\n"
    )
    assert done.stdout.strip() == "refused", done.stderr


def test_transformers_sees_no_torch_after_the_guard() -> None:
    done = _child(
        "import transformers\n"  # imported first: its cached answer must be cleared
        "from server_runtime.torch_guard import forbid_torch\n"
        "forbid_torch()\n"
        "from transformers.utils import is_torch_available\n"
        "from transformers import AutoConfig\n"
        "print(is_torch_available())\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert "PyTorch was not found" not in done.stderr


def test_guard_refuses_when_torch_is_already_loaded() -> None:
    import torch  # noqa: F401  # loaded in this test process anyway

    with pytest.raises(TorchAlreadyLoadedError, match="torch is already imported"):
        forbid_torch()
