"""Building, caching and choosing the native kernels (no model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine.kernels.build
from engine.config import EngineConfig, KernelChoice, ModelConfig
from engine.kernels import KernelBuildError, load_linear, load_paged_attention
from engine.native import load_attention_kernel, load_linear_kernel

CPU = torch.device("cpu")


def _config(tmp_path: Path, choice: KernelChoice) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(cache_dir=tmp_path), attention_kernel=choice, layer_kernels=choice
    )


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.kernels.build.shutil, "which", lambda name: None)


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


def test_sources_build_side_by_side(tmp_path: Path) -> None:
    attention = load_paged_attention(tmp_path)
    linear = load_linear(tmp_path)
    assert attention.path.parent == linear.path.parent == tmp_path / "kernels"
    assert attention.path.name.startswith("paged_attention-")
    assert linear.path.name.startswith("linear-")


@pytest.mark.parametrize("load", [load_attention_kernel, load_linear_kernel])
def test_auto_falls_back_to_torch_without_a_compiler(
    tmp_path: Path, no_compiler: None, load
) -> None:
    assert load(_config(tmp_path, KernelChoice.AUTO), torch.float32, CPU) is None
    with pytest.raises(KernelBuildError, match="no C compiler"):
        load(_config(tmp_path, KernelChoice.NATIVE), torch.float32, CPU)


def test_attention_choice_and_dtype(tmp_path: Path) -> None:
    assert load_attention_kernel(_config(tmp_path, KernelChoice.TORCH), torch.float32, CPU) is None
    auto = _config(tmp_path, KernelChoice.AUTO)
    assert load_attention_kernel(auto, torch.float32, CPU) is not None
    assert load_attention_kernel(auto, torch.bfloat16, CPU) is not None
    # no kernel for float16: torch, or an error when asked for
    assert load_attention_kernel(auto, torch.float16, CPU) is None
    with pytest.raises(KernelBuildError, match="float16"):
        load_attention_kernel(_config(tmp_path, KernelChoice.NATIVE), torch.float16, CPU)


def test_linear_choice_and_dtype(tmp_path: Path) -> None:
    assert load_linear_kernel(_config(tmp_path, KernelChoice.TORCH), torch.float32, CPU) is None
    auto = _config(tmp_path, KernelChoice.AUTO)
    assert load_linear_kernel(auto, torch.bfloat16, CPU) is None  # float32 only
    with pytest.raises(KernelBuildError, match="bfloat16"):
        load_linear_kernel(_config(tmp_path, KernelChoice.NATIVE), torch.bfloat16, CPU)
    assert load_linear_kernel(auto, torch.float32, CPU) is not None


def test_headers_are_part_of_the_key_and_left_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_linear(tmp_path)
    real = engine.kernels.build.resources.files
    package = real("engine.kernels")
    changed = tmp_path / "pkg"
    changed.mkdir()
    for entry in package.iterdir():
        if entry.name.endswith((".c", ".h")):
            (changed / entry.name).write_bytes(entry.read_bytes())
    header = (changed / "pd_exp2.h").read_bytes()
    (changed / "pd_exp2.h").write_bytes(header + b"\n/* edited */\n")
    monkeypatch.setattr(engine.kernels.build.resources, "files", lambda name: changed)
    second = load_linear(tmp_path)
    assert second.path != first.path  # a header edit rebuilds
    assert (changed / "pd_exp2.h").read_bytes().endswith(b"/* edited */\n")


def test_read_only_cache_builds_in_the_temp_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "image"  # as in the image: the cache is mounted read-only
    access = engine.kernels.build.os.access
    monkeypatch.setattr(
        engine.kernels.build.os,
        "access",
        lambda path, mode: False if Path(path).is_relative_to(cache) else access(path, mode),
    )
    monkeypatch.setattr(engine.kernels.build.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    kernel = load_paged_attention(cache)
    assert kernel.path.parent == tmp_path / "tmp" / "pdserve-kernels"
    assert load_paged_attention(cache).path == kernel.path  # found there the next time
