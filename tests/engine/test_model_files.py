"""engine.model_files: --model resolution and the ModelSpec read from a model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import ModelLoadError
from engine.config import DEFAULT_MODEL, ModelConfig
from engine.model_files import (
    default_model_dir,
    describe_model,
    is_default_model,
    resolve_model_path,
)
from tests.support.tiny_models import MAX_POSITIONS, build_tiny_model


def test_a_local_folder_resolves_to_itself(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(ModelConfig(model=str(tmp_path))) == tmp_path


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        resolve_model_path(ModelConfig(model=str(tmp_path)))


def test_an_unknown_hub_id_is_refused_without_downloading() -> None:
    with pytest.raises(ModelLoadError, match="never downloads at run time"):
        resolve_model_path(ModelConfig(model="nobody/no-such-model-anywhere"))


def test_the_default_model_is_converted_by_the_given_converter_once(tmp_path: Path) -> None:
    config = ModelConfig(model=DEFAULT_MODEL, cache_dir=tmp_path)
    calls: list[Path] = []

    def convert(target: Path) -> Path:
        calls.append(target)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"")
        return target

    assert resolve_model_path(config, convert) == default_model_dir(config)
    assert resolve_model_path(config, convert) == default_model_dir(config)
    assert calls == [tmp_path / "models" / DEFAULT_MODEL]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_describe_model_reads_the_kv_geometry(tmp_path: Path, arch: str) -> None:
    path = build_tiny_model(tmp_path, arch, vocab_size=512)
    config = json.loads((path / "config.json").read_text())
    spec = describe_model("tiny", path)
    assert spec.family == arch
    assert spec.vocab_size == 512
    assert spec.max_model_len == MAX_POSITIONS
    assert spec.num_layers == config.get("num_hidden_layers", config.get("n_layer"))
    assert spec.eos_token_ids == frozenset({0})
    assert len(spec.fingerprint) == 16


def test_an_unsupported_family_is_refused(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path, "llama", vocab_size=512)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "bert"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="not supported"):
        describe_model("tiny", path)


def test_the_default_model_is_known_by_alias_or_by_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "models" / DEFAULT_MODEL
    folder.mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    for name, expected in [
        ("default", True),
        (DEFAULT_MODEL, True),
        (str(folder), True),
        (str(tmp_path / "models" / "." / DEFAULT_MODEL), True),
        (str(other), False),
        (str(tmp_path / "missing"), False),
    ]:
        assert is_default_model(ModelConfig(model=name, cache_dir=tmp_path)) is expected, name
