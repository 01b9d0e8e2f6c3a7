"""The device a worker computes on, what ``--dtype`` means there, and the process-wide math
settings for it: resolved once when the engine starts (never at import)."""

from __future__ import annotations

import structlog
import torch

from engine.config import DType

log = structlog.get_logger(__name__)

TORCH_DTYPES = {
    DType.FLOAT32: torch.float32,
    DType.BFLOAT16: torch.bfloat16,
    DType.FLOAT16: torch.float16,
}


def select_device(requested: str) -> torch.device:
    """``auto``: CUDA when a GPU is present, else CPU; anything else as torch spells it."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_dtype(choice: DType, device: torch.device) -> DType:
    """The dtype ``choice`` means on ``device`` (:meth:`DType.resolve`): AUTO is bfloat16 on a
    GPU that computes in it natively, float16 on an older one, float32 off CUDA."""
    if choice is not DType.AUTO or device.type != "cuda":
        return choice.resolve(device.type)
    return choice.resolve("cuda", torch.cuda.is_bf16_supported(including_emulation=False))


def prepare_device(device: torch.device) -> None:
    """Process-wide settings for computing on ``device``: on CUDA, float32 matrix products
    (and convolutions) in TF32, as vLLM and SGLang run them (a 10-bit mantissa on the inputs,
    float32 accumulation; bfloat16 and float16 products are unaffected). CPU math is left as
    it is (its kernels and the greedy-equality tests assume IEEE float32)."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log.info("device_prepared", device=str(device), tf32=True)
