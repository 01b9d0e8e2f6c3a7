"""Start-up shared by the prefill and decode entry points."""

from __future__ import annotations

import torch

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.model_loader import load_model


def build_engine(config: EngineConfig) -> AsyncEngine:
    """Load the model and wrap it in an engine (call inside the worker's event loop)."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    model, spec = load_model(config.model)
    return AsyncEngine(config, model, spec)
