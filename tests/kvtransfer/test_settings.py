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
from kvtransfer.settings import BACKENDS, STREAMING, TRANSFER, check_flags, transfer_config


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


def test_kv_encrypt_needs_a_key_and_a_host_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    for setting in TRANSFER:
        monkeypatch.delenv(setting.env_var, raising=False)
    monkeypatch.delenv("PDSERVE_KV_KEY", raising=False)
    with pytest.raises(ValueError, match="--kv-encrypt needs the fleet's key"):
        transfer_config(_args(["--kv-encrypt", "--kv-insecure"]))
    monkeypatch.setenv("PDSERVE_KV_KEY", "s" * 32)
    for backend in ("gloo", "nccl"):
        with pytest.raises(ValueError, match=f"not available with --kv-backend {backend}"):
            transfer_config(_args(["--kv-encrypt", "--kv-backend", backend]))
        with pytest.raises(ValueError, match=f"not available with --kv-backend {backend}"):
            check_flags(_args(["--kv-encrypt", "--kv-backend", backend]), keyed=True)
    with pytest.raises(ValueError, match="needs the fleet's key"):
        check_flags(_args(["--kv-encrypt"]), keyed=False)
    check_flags(_args(["--kv-encrypt", "--kv-backend", "stream"]), keyed=True)
    cfg = transfer_config(_args(["--kv-backend", "stream"]))
    assert not cfg.encrypt and cfg.integrity == "aes-256-gmac"
    monkeypatch.setenv("PDSERVE_KV_ENCRYPT", "on")
    cfg = transfer_config(_args(["--kv-backend", "stream"]))
    assert cfg.encrypt and cfg.auth().encrypt and cfg.integrity == "aes-256-gcm"
