"""Backends that cannot move the KV cache's pages are refused at start, naming why: nccl off
CUDA or without NCCL in torch, gloo with the cache on a GPU (it stages nothing through the
host). zmq and stream carry any device's pages. The refusal is a ValueError
(:class:`BackendDeviceError`), so the worker commands and ``pdserve up`` answer it as they
answer every contradictory setting: a message and exit status 2, before any model loads."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from kvtransfer.config import Backend, BackendDeviceError, check_backend_device
from kvtransfer.modes import device_refusal
from pdserve import launcher
from pdserve.cli import build_parser

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("backend", "device_type", "nccl", "refused"),
    [
        (Backend.ZMQ, "cpu", False, None),
        (Backend.ZMQ, "cuda", False, None),  # host staging
        (Backend.STREAM, "cuda", False, None),
        (Backend.GLOO, "cpu", False, None),
        (Backend.GLOO, "cuda", True, "gloo moves CPU tensors only"),
        (Backend.NCCL, "cuda", True, None),
        (Backend.NCCL, "cpu", True, "nccl moves CUDA tensors"),
        (Backend.NCCL, "cuda", False, "needs a torch build with NCCL"),
    ],
)
def test_which_backend_carries_which_device(
    backend: Backend, device_type: str, nccl: bool, refused: str | None
) -> None:
    why = device_refusal(backend, device_type, nccl)
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why and f"--kv-backend {backend.value}" in why


def test_the_error_is_a_named_value_error() -> None:
    with pytest.raises(BackendDeviceError, match="nccl moves CUDA tensors") as raised:
        check_backend_device(Backend.NCCL, CPU)
    assert isinstance(raised.value, ValueError)
    with pytest.raises(BackendDeviceError, match="gloo moves CPU tensors only"):
        check_backend_device(Backend.GLOO, CUDA)
    check_backend_device(Backend.GLOO, CPU)
    check_backend_device(Backend.STREAM, CUDA)


def test_nccl_on_cuda_needs_nccl_in_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    with pytest.raises(BackendDeviceError, match="is_nccl_available"):
        check_backend_device(Backend.NCCL, CUDA)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    check_backend_device(Backend.NCCL, CUDA)


def test_a_device_flag_is_resolved_as_the_engine_resolves_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendDeviceError, match="on cpu"):
        check_backend_device(Backend.NCCL, "auto")
    check_backend_device(Backend.GLOO, "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(BackendDeviceError, match="on cuda"):
        check_backend_device(Backend.GLOO, "auto")
    with pytest.raises(BackendDeviceError, match="on cuda"):
        check_backend_device(Backend.GLOO, "cuda:1")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("PDSERVE_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("command", ["prefill", "decode"])
def test_a_worker_refuses_before_loading_the_model(command: str) -> None:
    """In a process of its own, as it runs (main() configures the process's logging)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_")}
    argv = [sys.executable, "-m", "pdserve.cli", command, "--kv-insecure"]
    argv += ["--kv-backend", "nccl", "--device", "cpu"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"pdserve {command}: --kv-backend nccl moves CUDA tensors")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        (("--kv-backend=nccl", "--device=cpu"), True),
        (("--kv-backend=gloo", "--device=cuda:0"), True),
        (("--kv-backend=gloo", "--device=cpu"), False),
        (("--kv-backend=nccl", "--device=auto"), False),  # only a worker knows what auto is
    ],
)
def test_up_refuses_what_every_worker_would(
    flags: tuple[str, ...], refused: bool, clean_env: None
) -> None:
    why = launcher._refused(build_parser().parse_args(["up", "--kv-insecure", *flags]))
    assert (why is not None and "--kv-backend" in why) is refused
