"""What benchmarks/gpu_check.py and tests/gpu share: the machine's capabilities, random models
of a named shape, and the in-process engine's helpers. Nothing here touches CUDA at import."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M-Instruct, the default model (engine.config.DEFAULT_MODEL)
    "default": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
    },
    # a 2-layer toy: the sections' logic on CPU (``--device cpu --shapes tiny``), no figures
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 512,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
    },
    # Llama-3.2-1B's shape
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
    },
}

# -- what this machine offers (no CUDA needed) --------------------------------------------------


def capabilities() -> dict[str, Any]:
    """Versions and detected features: torch, CUDA, transformers, the GPU, varlen attention."""
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        info["transformers"] = f"missing ({exc})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["bf16"] = torch.cuda.is_bf16_supported()
    info.update(_varlen_capabilities())
    return info


def _varlen_capabilities() -> dict[str, Any]:
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return {"varlen_attn": False}
    fn = getattr(varlen, "varlen_attn", None)
    if fn is None:
        return {"varlen_attn": False}
    try:
        params = set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = set()
    return {
        "varlen_attn": True,
        "varlen_block_table": "block_table" in params,
        "varlen_seqused_k": "seqused_k" in params,
        "varlen_num_splits": "num_splits" in params,
        "varlen_params": sorted(params),
    }


def engine_has_graphs_setting() -> str | None:
    """The name of the EngineConfig field that switches CUDA graphs, if the engine has one."""
    from engine.config import EngineConfig

    for f in dataclasses.fields(EngineConfig):
        if "graph" in f.name:
            return f.name
    return None


# -- models ---------------------------------------------------------------------------------


def build_random_model(path: Path, shape: str, seed: int = 0, init_range: float = 0.02) -> Path:
    """A transformers Llama folder of ``shape`` (``SHAPES``) with seeded random weights (saved
    in bfloat16: float32 loads them exactly) and a byte-level tokenizer padded to the
    vocabulary; built on CUDA when present (fast init)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from tests.support.tokenizers import build_byte_level_tokenizer

    dims = dict(SHAPES[shape])
    rope_theta = dims.pop("rope_theta")
    tokenizer = build_byte_level_tokenizer(dims["vocab_size"])
    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        **dims,
        max_position_embeddings=8192,
        initializer_range=init_range,
        rope_parameters={"rope_theta": rope_theta, "rope_type": "default"},
        bos_token_id=None,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        if device == "cuda":
            torch.cuda.manual_seed(seed)
        model = LlamaForCausalLM(config).eval().to(torch.bfloat16)  # half the bytes to save
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def load(path: Path, dtype: str, device: str = "cuda") -> tuple[Any, Any]:
    """``(model, spec)`` on ``device`` in ``dtype`` through the engine's own loader."""
    from engine.config import DType, ModelConfig
    from engine.model_loader import load_model

    return load_model(ModelConfig(model=str(path), dtype=DType(dtype), device=device))


def sync() -> None:
    """Wait for the GPU's queued work (nothing to wait for without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


VARLEN_BLOCK_SIZE = 256
"""Paged FlashAttention 2 reads KV in pages of a multiple of 256 slots (engine.attention_varlen);
a pool of smaller blocks runs the gather fallback."""


def make_engine(
    model: Any,
    spec: Any,
    *,
    block_size: int = VARLEN_BLOCK_SIZE,
    pool_tokens: int = 65536,
    max_seqs: int = 64,
    budget: int = 4096,
    **overrides: Any,
) -> Any:
    """An in-process engine whose KV pool holds ``pool_tokens`` slots in blocks of
    ``block_size``; ``overrides``: other :class:`~engine.config.EngineConfig` fields."""
    from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from engine.engine import Engine

    config = EngineConfig(
        model=ModelConfig(model=str(spec.path)),
        cache=CacheConfig(block_size=block_size, num_blocks=max(8, pool_tokens // block_size)),
        scheduler=SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget),
        **overrides,
    )
    return Engine(config, model, spec, sink=lambda outputs: None)


def attention_path(engine: Any) -> str:
    """Which attention the engine's runner took: varlen FlashAttention or the fallback."""
    return "varlen" if getattr(engine.runner, "varlen", None) is not None else "fallback"


def graph_path(engine: Any) -> str:
    """The batch sizes whose decode steps replay a CUDA graph, or ``eager``."""
    graphs = getattr(engine.runner, "graphs", None)
    captured = graphs.captured if graphs is not None else ()
    return "graphs " + ",".join(map(str, captured)) if captured else "eager"


def run_to_completion(engine: Any, steps_limit: int = 100_000) -> list[Any]:
    outputs: list[Any] = []
    for _ in range(steps_limit):
        if not engine.scheduler.has_work():
            return outputs
        outputs.extend(engine.step())
    raise RuntimeError("engine did not finish")


def generated(outputs: list[Any], request_id: str) -> list[int]:
    return [t for o in outputs if o.request_id == request_id for t in o.token_ids]


def sequence(spec: Any, rid: str, prompt: list[int], n: int, **sampling: Any) -> Any:
    from core.sampling import SamplingParams
    from engine.sequence import Sequence

    params = SamplingParams(max_tokens=n, **{"temperature": 0.0, **sampling})
    return Sequence(rid, list(prompt), len(prompt), params, spec.eos_token_ids)


def greedy_reference(model: Any, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation (before an engine takes the model over)."""
    import torch

    with torch.inference_mode():
        ids = torch.tensor([prompt], device=next(model.parameters()).device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            top_k=None,
            top_p=None,
            temperature=None,
        )
    return [int(t) for t in out[0, len(prompt) :]]


def weight_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def copy_bandwidth(device: str, nbytes: int = 2**30) -> float:
    """Device-to-device copy, bytes read plus written per second (the HBM bound's bandwidth)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    start = time.perf_counter()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    sync()
    return 2 * nbytes * reps / (time.perf_counter() - start)


def free_memory() -> None:
    """Collect what a section dropped and give its GPU memory back (call after ``del``)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
