"""engine.weights_digest: the model fingerprint covers the weights' bytes, hashed once and
cached beside the model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine import weights_digest
from engine.model_files import describe_model
from engine.weights_digest import CACHE_NAME, file_digest
from tests.support.tiny_models import build_tiny_model


def _twins(tmp_path: Path) -> tuple[Path, Path]:
    """Two fine-tunes of one architecture: the same config, file names and sizes, other bytes."""
    a = build_tiny_model(tmp_path / "a", "llama", vocab_size=512, seed=0)
    b = build_tiny_model(tmp_path / "b", "llama", vocab_size=512, seed=1)
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    files_a = {f.name: f.stat().st_size for f in a.glob("*.safetensors")}
    assert files_a and files_a == {f.name: f.stat().st_size for f in b.glob("*.safetensors")}
    return a, b


def test_fine_tunes_of_one_architecture_differ(tmp_path: Path) -> None:
    a, b = _twins(tmp_path)
    assert describe_model("a", a).fingerprint != describe_model("b", b).fingerprint
    assert describe_model("a", a).fingerprint == describe_model("again", a).fingerprint


def test_the_digest_is_cached_and_a_changed_file_is_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = build_tiny_model(tmp_path, "llama", vocab_size=512)
    hashed: list[str] = []

    def counting(file: Path) -> str:
        hashed.append(file.name)
        return file_digest(file)

    monkeypatch.setattr(weights_digest, "file_digest", counting)
    first = describe_model("tiny", path).fingerprint
    assert hashed == ["model.safetensors"]
    cache = json.loads((path / CACHE_NAME).read_text())
    assert set(cache["files"]) == {"model.safetensors"}
    assert describe_model("tiny", path).fingerprint == first
    assert hashed == ["model.safetensors"], "a restart must not hash the weights again"

    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert describe_model("tiny", path).fingerprint != first
    assert hashed == ["model.safetensors"] * 2


def test_a_stale_or_broken_cache_is_ignored(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path, "llama", vocab_size=512)
    first = describe_model("tiny", path).fingerprint
    for text in ("not json", "[]", json.dumps({"algorithm": "md5", "files": {}})):
        (path / CACHE_NAME).write_text(text)
        assert describe_model("tiny", path).fingerprint == first
    assert json.loads((path / CACHE_NAME).read_text())["algorithm"] == "sha256"


def test_a_read_only_folder_is_hashed_without_a_cache(tmp_path: Path) -> None:
    path = build_tiny_model(tmp_path, "llama", vocab_size=512)
    expected = describe_model("tiny", path).fingerprint
    (path / CACHE_NAME).unlink()
    path.chmod(0o555)
    try:
        assert describe_model("tiny", path).fingerprint == expected
        assert not (path / CACHE_NAME).exists() or os.geteuid() == 0
    finally:
        path.chmod(0o755)
