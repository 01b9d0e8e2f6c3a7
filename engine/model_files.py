"""Where a model's files are and what they say: no weights, no torch (the gateway reads it).

``--model`` resolves to a local folder (the default model's converted folder, a transformers
folder, or a hub id in the local Hugging Face cache) and :func:`describe_model` reads its
config into a :class:`ModelSpec`. Nothing here touches the network. Converting the default
model's GGUF needs torch: it runs in the caller's ``convert`` or else in a child process.
transformers' config classes import torch when it is installed; a process that must not load
it hides it first (:func:`server_runtime.torch_guard.forbid_torch`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import ModelLoadError
from engine.config import DEFAULT_MODEL, ModelConfig
from engine.weights_digest import weights_digest

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SUPPORTED_FAMILIES = frozenset({"llama", "qwen2", "mistral", "gpt2"})
DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL, DEFAULT_MODEL.lower(), "default", "smollm2"})


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of pdserve needs to know about a model."""

    name: str
    path: Path
    family: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    fingerprint: str
    """Hash of the config and of the weight files' names and content
    (:func:`engine.weights_digest.weights_digest`, cached beside the model): KV peers must
    agree on it, so two fine-tunes of one architecture refuse each other's pages."""
    weights: str = "float"
    """What its linear layers compute from, as a worker serves it (``--weights``; set by the
    engine: :attr:`engine.quantized_weights.WeightPlan.label`). Part of the KV fingerprint."""


def default_cache_dir() -> Path:
    """``$PDSERVE_CACHE_DIR`` or ``~/.cache/pdserve``; read by entry points only."""
    env = os.environ.get("PDSERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pdserve"


def default_model_dir(config: ModelConfig) -> Path:
    """Where the default model is (or will be) converted to."""
    return (config.cache_dir or default_cache_dir()) / "models" / DEFAULT_MODEL


def is_default_model(config: ModelConfig) -> bool:
    """Whether ``config`` names the default model: one of its aliases, or the folder it is
    converted to (what ``pdserve up`` passes its workers)."""
    if config.model in DEFAULT_MODEL_ALIASES:
        return True
    path = Path(config.model).expanduser()
    return path.is_dir() and path.resolve() == default_model_dir(config).resolve()


def is_converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def resolve_model_path(config: ModelConfig, convert: Callable[[Path], Path] | None = None) -> Path:
    """A local folder holding the model's config, weights and tokenizer.

    The default model is converted on first use by ``convert`` (in this process), or without
    one by ``python -m engine.model_loader --convert`` in a child process.
    """
    name = config.model
    if name in DEFAULT_MODEL_ALIASES:
        target = default_model_dir(config)
        if is_converted(target):
            return target
        return (convert or _convert_in_child)(target)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a transformers model folder")
        return path
    return _resolve_hub_cache(name)


def _convert_in_child(target: Path) -> Path:
    argv = [sys.executable, "-m", "engine.model_loader", "--convert", str(target)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not is_converted(target):
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(f"converting the default model into {target} failed: {detail[0]}")
    return target


def _resolve_hub_cache(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:
        raise ModelLoadError(
            f"model {repo_id!r} is neither a local folder nor in the local Hugging Face cache "
            f"(pdserve never downloads at run time): {exc}"
        ) from exc


def load_hf_config(path: Path) -> PretrainedConfig:
    """The model's transformers config; refuses families pdserve does not serve."""
    from transformers import AutoConfig  # its import loads torch where torch is not hidden

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ModelLoadError(
            f"model family {config.model_type!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_FAMILIES))})"
        )
    return config


def describe_model(name: str, path: Path, config: PretrainedConfig | None = None) -> ModelSpec:
    """The KV geometry, context length and stop tokens of the model in ``path``."""
    config = load_hf_config(path) if config is None else config
    text = config.get_text_config()
    num_heads = text.num_attention_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    max_len: int = (
        getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 2048
    )
    return ModelSpec(
        name=name,
        path=path,
        family=config.model_type,
        num_layers=text.num_hidden_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        max_model_len=int(max_len),
        eos_token_ids=_eos_token_ids(path, config),
        fingerprint=_fingerprint(path),
    )


def _eos_token_ids(path: Path, config: PretrainedConfig) -> frozenset[int]:
    ids: set[int] = set()
    for source in (config, _generation_config(path)):
        value = source.get("eos_token_id") if isinstance(source, dict) else source.eos_token_id
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _generation_config(path: Path) -> dict[str, Any]:
    file = path / "generation_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    digest.update((path / "config.json").read_bytes())
    digest.update(f"weights:{weights_digest(path)}".encode())
    return digest.hexdigest()[:16]
