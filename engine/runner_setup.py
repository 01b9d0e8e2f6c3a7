"""An engine's model runner, assembled from its config: the native kernels it takes and the
weights its linear layers compute from (:mod:`engine.native`, :mod:`engine.quantized_weights`)."""

from __future__ import annotations

import structlog
import torch

from engine.config import DEFAULT_MODEL, EngineConfig, WeightsChoice
from engine.kv_cache import KVCache
from engine.model_files import is_default_model
from engine.model_runner import ModelRunner
from engine.native import (
    load_attention_kernel,
    load_layer_ops,
    load_linear_kernel,
    load_quant_linear_kernel,
)
from engine.quantized_weights import plan_weights
from engine.sampler import Sampler
from engine.structured import GrammarManager

log = structlog.get_logger(__name__)


def build_runner(
    config: EngineConfig, model: torch.nn.Module, kv_cache: KVCache, grammars: GrammarManager
) -> ModelRunner:
    """The runner for ``model`` (which it takes over) with the kernels ``config`` asks for.

    Raises :class:`~engine.kernels.KernelBuildError` for a kernel asked for as ``native`` that
    cannot run here, :class:`~core.errors.ModelLoadError` for ``--weights`` it cannot honour."""
    dtype, device = kv_cache.dtype, kv_cache.device  # the weights' (the cache matches them)
    quant = load_quant_linear_kernel(config, dtype, device)
    name = DEFAULT_MODEL if is_default_model(config.model) else config.model.model
    weights = plan_weights(config.weights, name, model, quant is not None)
    log.info("weights_planned", weights=weights.label)
    return ModelRunner(
        model,
        kv_cache,
        Sampler(),
        load_attention_kernel(config, dtype, device),
        load_linear_kernel(config, dtype, device),
        load_layer_ops(config, dtype, device),
        grammars=grammars,
        weights=weights,
        quant=None if weights.choice is WeightsChoice.FLOAT else quant,
    )
