"""Which native kernels (:mod:`engine.kernels`) an engine runs, as its config asks.

``auto`` takes a kernel where it applies and builds, and otherwise logs why and keeps torch;
``native`` turns both into an error at start-up; ``torch`` never builds anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import structlog
import torch

from engine.config import EngineConfig, KernelChoice, WeightsChoice
from engine.kernels import (
    KernelBuildError,
    LayerOps,
    LinearKernel,
    PagedAttentionKernel,
    load_linear,
    load_paged_attention,
)
from engine.kernels import load_layer_ops as load_layer_ops_kernel
from engine.kernels.quant_linear import QuantLinearKernel, load_quant_linear
from engine.model_files import default_cache_dir

log = structlog.get_logger(__name__)


class _Kernel(Protocol):
    @property
    def path(self) -> Path: ...


K = TypeVar("K", bound=_Kernel)


@dataclass(frozen=True)
class _Native(Generic[K]):
    name: str  # in log events: <name>_loaded, <name>_unavailable
    supports: Callable[[torch.dtype, torch.device], bool]
    supported: str  # what ``supports`` accepts, in words
    load: Callable[[Path], K]  # from the cache directory


_ATTENTION = _Native(
    "attention_kernel",
    PagedAttentionKernel.supports,
    "CPU in float32 or bfloat16",
    load_paged_attention,
)
_LINEAR = _Native("linear_kernel", LinearKernel.supports, "CPU in float32", load_linear)
_QUANT_LINEAR = _Native(
    "quant_linear_kernel",
    QuantLinearKernel.supports,
    "CPU in float32 (with AVX2, FMA and F16C)",
    load_quant_linear,
)
_LAYER_OPS = _Native("layer_ops", LayerOps.supports, "CPU in float32", load_layer_ops_kernel)


def load_attention_kernel(
    config: EngineConfig, dtype: torch.dtype, device: torch.device
) -> PagedAttentionKernel | None:
    """The paged decode attention kernel for a KV cache of ``dtype`` on ``device``, or None."""
    return _load(_ATTENTION, config.attention_kernel, config, dtype, device)


def load_linear_kernel(
    config: EngineConfig, dtype: torch.dtype, device: torch.device
) -> LinearKernel | None:
    """The linear-layer kernel for weights of ``dtype`` on ``device``, or None."""
    return _load(_LINEAR, config.layer_kernels, config, dtype, device)


def load_quant_linear_kernel(
    config: EngineConfig, dtype: torch.dtype, device: torch.device
) -> QuantLinearKernel | None:
    """The quantized linear-layer kernel for activations of ``dtype`` on ``device``, or None
    (``--weights float``, or where it does not apply or build and ``--layer-kernels`` is not
    ``native``)."""
    if config.weights is WeightsChoice.FLOAT:
        return None
    return _load(_QUANT_LINEAR, config.layer_kernels, config, dtype, device)


def load_layer_ops(
    config: EngineConfig, dtype: torch.dtype, device: torch.device
) -> LayerOps | None:
    """RMSNorm, RoPE and SiLU in C for a model of ``dtype`` on ``device``, or None."""
    return _load(_LAYER_OPS, config.layer_kernels, config, dtype, device)


def _load(
    native: _Native[K],
    choice: KernelChoice,
    config: EngineConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> K | None:
    if choice is KernelChoice.TORCH:
        return None
    if not native.supports(dtype, device):
        if choice is KernelChoice.NATIVE:
            what = native.name.replace("_", " ")
            raise KernelBuildError(
                f"the native {what} runs on {native.supported}, not on {device.type} in {dtype}"
            )
        return None
    try:
        kernel = native.load(config.model.cache_dir or default_cache_dir())
    except KernelBuildError as exc:
        if choice is KernelChoice.NATIVE:
            raise
        log.warning(f"{native.name}_unavailable", error=str(exc), fallback="torch")
        return None
    log.info(f"{native.name}_loaded", path=str(kernel.path))
    return kernel
