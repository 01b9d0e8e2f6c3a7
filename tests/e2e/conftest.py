"""Session-wide clusters: starting processes is the slow part, so tests share them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.config import ModelConfig
from engine.model_files import default_cache_dir, resolve_model_path
from pdserve.local_cluster import Cluster, free_port_range, start_cluster
from tests.support.tiny_models import build_tiny_model

TINY_ARCHS = ("llama", "qwen2", "mistral", "gpt2")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model, converted once (as the CLI does) into the usual cache."""
    return resolve_model_path(ModelConfig(cache_dir=default_cache_dir()))


@pytest.fixture(scope="session")
def cluster_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster-logs")


def _cluster(
    model: str, prefill: int, logs: Path, extra: tuple[str, ...] = (), http_port: int = 0
) -> Iterator[Cluster]:
    cluster = start_cluster(
        model, prefill=prefill, decode=1, log_dir=logs, extra=extra, http_port=http_port
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session", params=["disaggregated", "colocated"])
def default_cluster(
    request: pytest.FixtureRequest, default_model_path: Path, cluster_logs: Path
) -> Iterator[Cluster]:
    """With the HTTP API too (``cluster.http``)."""
    yield from _cluster(
        str(default_model_path),
        1 if request.param == "disaggregated" else 0,
        cluster_logs,
        http_port=free_port_range(1),
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(
    scope="module",
    params=[(a, m) for a in TINY_ARCHS for m in ("disagg", "coloc")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def tiny_cluster(
    request: pytest.FixtureRequest, tiny_model_dir: Path, cluster_logs: Path
) -> Iterator[tuple[Path, Cluster]]:
    arch, mode = request.param
    path = tiny_model_dir / arch
    if not (path / "config.json").exists():
        build_tiny_model(path, arch, vocab_size=512, seed=1)
    for cluster in _cluster(str(path), 1 if mode == "disagg" else 0, cluster_logs):
        yield path, cluster


TRANSFER_VARIANTS = {
    "gloo": ("--kv-backend", "gloo"),
    "ipc": ("--kv-transport", "ipc"),
    "stream": ("--kv-backend", "stream"),
    "stream-ipc": ("--kv-backend", "stream", "--kv-transport", "ipc"),
    "after-prefill-insecure": ("--kv-streaming", "after-prefill", "--kv-insecure"),
}


@pytest.fixture(scope="module", params=sorted(TRANSFER_VARIANTS))
def transfer_variant_cluster(
    request: pytest.FixtureRequest, default_model_path: Path, cluster_logs: Path
) -> Iterator[Cluster]:
    yield from _cluster(str(default_model_path), 1, cluster_logs, TRANSFER_VARIANTS[request.param])
