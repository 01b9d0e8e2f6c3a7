"""kvtransfer.settings spells the backend and streaming choices without importing torch; they
stay the enums' values."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from core.settings import add_settings
from kvtransfer.config import Streaming
from kvtransfer.datapath import Backend
from kvtransfer.settings import BACKENDS, STREAMING, TRANSFER, transfer_config


def test_choices_are_the_enums_values() -> None:
    assert tuple(b.value for b in Backend) == BACKENDS
    assert tuple(s.value for s in Streaming) == STREAMING


def test_the_settings_module_imports_no_torch() -> None:
    code = "import sys, kvtransfer.settings; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"


def _args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_settings(parser, TRANSFER)
    return parser.parse_args(argv)


def test_transfer_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_KV_KEY", raising=False)
    for setting in TRANSFER:
        monkeypatch.delenv(setting.env_var, raising=False)
    with pytest.raises(ValueError, match="--kv-insecure"):
        transfer_config(_args([]))
    monkeypatch.setenv("PDSERVE_KV_KEY", "s" * 32)
    monkeypatch.setenv("PDSERVE_NO_KV_CHECKSUM", "on")
    cfg = transfer_config(_args(["--kv-backend", "stream", "--kv-max-queued-mb", "2"]))
    assert (cfg.backend, cfg.key, cfg.checksum) == (Backend.STREAM, b"s" * 32, False)
    assert cfg.max_queued_bytes == 2 << 20 and cfg.streaming is Streaming.LAYERWISE
