"""``--block-size auto``: 16 on CPU, 256 on CUDA where varlen FlashAttention runs, 16 where it
does not; an explicit size stands; the flag and its variable; the engine resolves it once
(logged) and the KV fingerprint carries the resolved size."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from core.settings import add_settings, to_argv
from engine.attention_varlen import (
    SMALL_BLOCK_SIZE,
    VARLEN_PAGE_MULTIPLE,
    VarlenSupport,
    choose_block_size,
)
from engine.config import AUTO_BLOCK_SIZE, CacheConfig, EngineConfig, ModelConfig
from engine.engine import Engine
from engine.settings import ENGINE, MODEL, engine_config
from kvtransfer.config import TransferConfig, fingerprint_for
from tests.engine.tiny_engine import tiny_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
FULL = VarlenSupport(has_varlen=True, takes_block_table=True, capability=(9, 0))
NO_PAGED = VarlenSupport(has_varlen=True, takes_block_table=False, capability=(9, 0))


@pytest.mark.parametrize(
    ("device", "dtype", "head_dim", "support", "want"),
    [
        (CPU, torch.float32, 64, VarlenSupport(False, False, None), SMALL_BLOCK_SIZE),
        (CPU, torch.bfloat16, 64, FULL, SMALL_BLOCK_SIZE),  # varlen is CUDA's alone
        (CUDA, torch.bfloat16, 64, FULL, VARLEN_PAGE_MULTIPLE),
        (CUDA, torch.float16, 128, FULL, VARLEN_PAGE_MULTIPLE),
        (CUDA, torch.float32, 64, FULL, SMALL_BLOCK_SIZE),  # FlashAttention takes no float32
        (CUDA, torch.bfloat16, 64, NO_PAGED, SMALL_BLOCK_SIZE),  # an older torch
        (CUDA, torch.bfloat16, 64, FULL._replace(capability=(7, 5)), SMALL_BLOCK_SIZE),
        (CUDA, torch.bfloat16, 80 + 4, FULL, SMALL_BLOCK_SIZE),  # head size not a multiple of 8
    ],
)
def test_auto_block_size_follows_the_attention_path(
    device: torch.device, dtype: torch.dtype, head_dim: int, support: VarlenSupport, want: int
) -> None:
    choice = choose_block_size(AUTO_BLOCK_SIZE, device, dtype, head_dim, support)
    assert choice.block_size == want
    assert choice.reason.startswith("auto: ")


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_an_explicit_block_size_stands(device: torch.device) -> None:
    assert choose_block_size(16, device, torch.bfloat16, 64, FULL) == (16, "--block-size")
    assert choose_block_size(512, device, torch.float32, 64, FULL).block_size == 512


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_settings(parser, MODEL, ENGINE)
    return parser.parse_args(argv)


def test_the_flag_takes_auto_or_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_BLOCK_SIZE", raising=False)
    assert engine_config(_parse([])).cache.block_size == AUTO_BLOCK_SIZE
    assert CacheConfig().block_size == AUTO_BLOCK_SIZE
    assert engine_config(_parse(["--block-size", "auto"])).cache.block_size == AUTO_BLOCK_SIZE
    assert engine_config(_parse(["--block-size", "256"])).cache.block_size == 256
    for bad in ("0", "-16", "big"):
        with pytest.raises(SystemExit):
            _parse(["--block-size", bad])


def test_the_variable_and_a_childs_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    setting = [s for s in ENGINE if s.flag == "--block-size"]
    monkeypatch.setenv("PDSERVE_BLOCK_SIZE", "auto")
    args = _parse([])
    assert args.block_size == AUTO_BLOCK_SIZE
    assert to_argv(setting, args) == ["--block-size", "auto"]  # the child resolves its own
    monkeypatch.setenv("PDSERVE_BLOCK_SIZE", "32")
    args = _parse([])
    assert to_argv(setting, args) == ["--block-size", "32"]
    assert _parse(to_argv(setting, args)).block_size == 32


def test_a_negative_block_size_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="--block-size"):
        CacheConfig(block_size=-1)


@pytest.mark.parametrize(("asked", "want"), [(AUTO_BLOCK_SIZE, SMALL_BLOCK_SIZE), (8, 8)])
def test_the_engine_resolves_it_once_and_the_fingerprint_records_it(
    tmp_path: Path, asked: int, want: int
) -> None:
    model, spec = tiny_model(tmp_path)
    config = EngineConfig(
        model=ModelConfig(model=str(spec.path)),
        cache=CacheConfig(block_size=asked, num_blocks=32),
    )
    with capture_logs() as logs:
        engine = Engine(config, model, spec, sink=lambda outputs: None)
    assert engine.kv_cache.block_size == want
    assert engine.config.cache.block_size == want  # what the rest of the engine reads
    assert engine.scheduler.block_size == want
    sized = [e for e in logs if e["event"] == "kv_pool_sized"]
    assert len(sized) == 1 and sized[0]["block_size"] == want
    assert sized[0]["block_size_reason"].startswith("auto" if asked == AUTO_BLOCK_SIZE else "--")
    assert engine.kv_cache.num_blocks == engine.pool.num_blocks == 32  # no padding on CPU
    fingerprint = fingerprint_for(engine.spec, engine.kv_cache, TransferConfig(insecure=True))
    assert fingerprint.block_size == want
