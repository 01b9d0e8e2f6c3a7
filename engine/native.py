"""Which native kernels (:mod:`engine.kernels`) an engine runs, as its config asks.

``auto`` takes a kernel where it applies and builds, and otherwise logs why and keeps torch;
``native`` turns both into an error at start-up; ``torch`` never builds anything.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import structlog
import torch

from engine.config import EngineConfig, KernelChoice
from engine.kernels import (
    KernelBuildError,
    LayerOps,
    LinearKernel,
    PagedAttentionKernel,
    load_linear,
    load_paged_attention,
)
from engine.kernels import load_layer_ops as load_layer_ops_kernel
from engine.model_loader import default_cache_dir

log = structlog.get_logger(__name__)


class _Kernel(Protocol):
    @property
    def path(self) -> Path: ...


K = TypeVar("K", bound=_Kernel)


def load_attention_kernel(
    config: EngineConfig, dtype: torch.dtype, device: torch.device
) -> PagedAttentionKernel | None:
    """The paged decode attention kernel for a KV cache of ``dtype`` on ``device``, or None."""
    return _load(
        "attention_kernel",
        config.attention_kernel,
        PagedAttentionKernel.supports(dtype, device),
        f"the native attention kernel runs on CPU in float32 or bfloat16, not on "
        f"{device.type} in {dtype}",
        lambda: load_paged_attention(config.model.cache_dir or default_cache_dir()),
    )


def load_linear_kernel(
    config: EngineConfig, dtype: torch.dtype, device: torch.device
) -> LinearKernel | None:
    """The linear-layer kernel for weights of ``dtype`` on ``device``, or None."""
    return _load(
        "linear_kernel",
        config.layer_kernels,
        LinearKernel.supports(dtype, device),
        f"the native linear kernel runs on CPU in float32, not on {device.type} in {dtype}",
        lambda: load_linear(config.model.cache_dir or default_cache_dir()),
    )


def load_layer_ops(
    config: EngineConfig, dtype: torch.dtype, device: torch.device
) -> LayerOps | None:
    """RMSNorm, RoPE and SiLU in C for a model of ``dtype`` on ``device``, or None."""
    return _load(
        "layer_ops",
        config.layer_kernels,
        LayerOps.supports(dtype, device),
        f"the native layer operations run on CPU in float32, not on {device.type} in {dtype}",
        lambda: load_layer_ops_kernel(config.model.cache_dir or default_cache_dir()),
    )


def _load(
    name: str, choice: KernelChoice, applies: bool, why_not: str, load: Callable[[], K]
) -> K | None:
    if choice is KernelChoice.TORCH:
        return None
    if not applies:
        if choice is KernelChoice.NATIVE:
            raise KernelBuildError(why_not)
        return None
    try:
        kernel = load()
    except KernelBuildError as exc:
        if choice is KernelChoice.NATIVE:
            raise
        log.warning(f"{name}_unavailable", error=str(exc), fallback="torch")
        return None
    log.info(f"{name}_loaded", path=str(kernel.path))
    return kernel
