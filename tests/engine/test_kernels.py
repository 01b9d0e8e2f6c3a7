"""Building, caching and choosing the native attention kernel (no model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine.kernels
from engine.config import AttentionKernel, EngineConfig, ModelConfig
from engine.engine import load_attention_kernel
from engine.kernels import KernelBuildError, load_paged_attention
from engine.kv_cache import KVCache


def _cache(dtype: torch.dtype = torch.float32) -> KVCache:
    return KVCache(2, 8, 4, 2, 8, dtype, torch.device("cpu"))


def _config(tmp_path: Path, choice: AttentionKernel) -> EngineConfig:
    return EngineConfig(model=ModelConfig(cache_dir=tmp_path), attention_kernel=choice)


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.kernels.shutil, "which", lambda name: None)


def test_built_once_then_loaded_from_the_cache(tmp_path: Path) -> None:
    first = load_paged_attention(tmp_path)
    built_at = first.path.stat().st_mtime_ns
    second = load_paged_attention(tmp_path)
    assert second.path == first.path
    assert second.path.stat().st_mtime_ns == built_at
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.path.name]  # no temp left


def test_no_compiler_is_a_named_error(tmp_path: Path, no_compiler: None) -> None:
    with pytest.raises(KernelBuildError, match="no C compiler"):
        load_paged_attention(tmp_path)


def test_auto_falls_back_to_torch_without_a_compiler(tmp_path: Path, no_compiler: None) -> None:
    assert load_attention_kernel(_config(tmp_path, AttentionKernel.AUTO), _cache()) is None
    with pytest.raises(KernelBuildError, match="no C compiler"):
        load_attention_kernel(_config(tmp_path, AttentionKernel.NATIVE), _cache())


def test_choice_and_dtype(tmp_path: Path) -> None:
    assert load_attention_kernel(_config(tmp_path, AttentionKernel.TORCH), _cache()) is None
    assert load_attention_kernel(_config(tmp_path, AttentionKernel.AUTO), _cache()) is not None
    bf16 = _cache(torch.bfloat16)
    assert load_attention_kernel(_config(tmp_path, AttentionKernel.AUTO), bf16) is not None
    fp16 = _cache(torch.float16)  # no kernel for it: torch, or an error when asked for
    assert load_attention_kernel(_config(tmp_path, AttentionKernel.AUTO), fp16) is None
    with pytest.raises(KernelBuildError, match="float16"):
        load_attention_kernel(_config(tmp_path, AttentionKernel.NATIVE), fp16)


def test_read_only_cache_builds_in_the_temp_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "image"  # as in the image: the cache is mounted read-only
    access = engine.kernels.os.access
    monkeypatch.setattr(
        engine.kernels.os,
        "access",
        lambda path, mode: False if Path(path).is_relative_to(cache) else access(path, mode),
    )
    monkeypatch.setattr(engine.kernels.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    kernel = load_paged_attention(cache)
    assert kernel.path.parent == tmp_path / "tmp" / "pdserve-kernels"
    assert load_paged_attention(cache).path == kernel.path  # found there the next time
