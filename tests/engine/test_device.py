"""What ``--dtype`` means on each device (AUTO: bfloat16 on CUDA, float16 on a GPU without
bfloat16, float32 on CPU), the flag's default, TF32 only on CUDA, and weights loaded straight
onto the device in the resolved dtype."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch

from core.settings import add_settings
from engine import device as engine_device
from engine import model_loader
from engine.config import DType, ModelConfig
from engine.device import prepare_device, resolve_dtype, select_device
from engine.settings import MODEL, model_config
from tests.support.tiny_models import build_tiny_model


@pytest.mark.parametrize(
    ("device_type", "has_bfloat16", "want"),
    [
        ("cuda", True, DType.BFLOAT16),
        ("cuda", False, DType.FLOAT16),
        ("cpu", True, DType.FLOAT32),
        ("cpu", False, DType.FLOAT32),
        ("mps", True, DType.FLOAT32),
    ],
)
def test_auto_is_the_devices_dtype(device_type: str, has_bfloat16: bool, want: DType) -> None:
    assert DType.AUTO.resolve(device_type, has_bfloat16) is want


@pytest.mark.parametrize("explicit", [DType.FLOAT32, DType.BFLOAT16, DType.FLOAT16])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_an_explicit_dtype_stands_on_any_device(explicit: DType, device_type: str) -> None:
    assert explicit.resolve(device_type, has_bfloat16=False) is explicit


def _parse(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    for setting in MODEL:
        monkeypatch.delenv(setting.env_var, raising=False)
    parser = argparse.ArgumentParser()
    add_settings(parser, MODEL)
    return parser.parse_args(argv)


def test_the_flag_defaults_to_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    assert model_config(_parse([], monkeypatch)).dtype is DType.AUTO
    assert ModelConfig().dtype is DType.AUTO
    given = model_config(_parse(["--dtype", "float32"], monkeypatch))
    assert given.dtype is DType.FLOAT32  # explicit float32 stays float32 on a GPU too


def test_resolve_dtype_on_cpu_is_float32() -> None:
    assert resolve_dtype(DType.AUTO, torch.device("cpu")) is DType.FLOAT32
    assert resolve_dtype(DType.BFLOAT16, torch.device("cpu")) is DType.BFLOAT16


@pytest.mark.parametrize(("native", "want"), [(True, DType.BFLOAT16), (False, DType.FLOAT16)])
def test_resolve_dtype_on_cuda_asks_for_native_bfloat16(
    monkeypatch: pytest.MonkeyPatch, native: bool, want: DType
) -> None:
    asked: list[bool] = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_dtype(DType.AUTO, torch.device("cuda", 0)) is want
    assert asked == [False]  # emulated bfloat16 is slower than float16
    assert resolve_dtype(DType.FLOAT32, torch.device("cuda", 0)) is DType.FLOAT32


def test_tf32_only_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        prepare_device(torch.device("cpu"))
        assert torch.backends.cuda.matmul.allow_tf32 is False
        prepare_device(torch.device("cuda", 0))  # flags only: no CUDA call
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def test_select_device() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device("cuda:1") == torch.device("cuda", 1)
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == want


def test_weights_load_straight_onto_the_device_in_the_resolved_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = build_tiny_model(tmp_path / "m", "llama", 512, seed=2)
    calls: list[dict[str, Any]] = []
    real = model_loader.AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_loader.AutoModelForCausalLM, "from_pretrained", spy)
    prepared: list[torch.device] = []
    monkeypatch.setattr(model_loader, "prepare_device", prepared.append)
    model, _ = model_loader.load_model(ModelConfig(model=str(path), device="cpu"))
    (kwargs,) = calls
    assert kwargs["device_map"] == torch.device("cpu") and kwargs["dtype"] is torch.float32
    assert prepared == [torch.device("cpu")]
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training
    assert engine_device.TORCH_DTYPES is model_loader.TORCH_DTYPES
