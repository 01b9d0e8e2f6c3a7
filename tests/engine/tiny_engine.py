"""Helpers for tests that run an engine on a tiny in-code model (no hub): the model folder,
engine configs, and transformers' greedy reference output to compare against."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.model_files import ModelSpec
from engine.model_loader import load_model
from tests.support.tiny_models import build_tiny_model


def tiny_model(path: Path, arch: str = "llama") -> tuple[torch.nn.Module, ModelSpec]:
    """A tiny random model of ``arch`` built into ``path`` and loaded: ``(model, spec)``."""
    folder = build_tiny_model(path, arch, 512, seed=2)
    return load_model(ModelConfig(model=str(folder)))


def engine_config(
    spec: ModelSpec, *, num_blocks: int = 128, block_size: int = 4, budget: int = 2048
) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model=str(spec.path)),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget),
    )


def greedy_reference(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy continuation (call before an engine takes the model over)."""
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = model.generate(  # type: ignore[operator]
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_k=None,
            top_p=None,
            temperature=None,
        )
    return [int(t) for t in out[0, len(prompt) :]]
