"""pdserve's own forward pass for Llama-family decoders (Llama, Mistral, Qwen2; SmolLM is Llama).

transformers' math over the packed batch, without its per-step overhead (:class:`LlamaForward`).
Invariants: RMSNorm, RoPE, SiLU and the residual adds are transformers' operations in the same
order, so greedy output stays token-identical to it (the tests compare); weights are shared with
the transformers model, not copied (its projections become views of the fused matrices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from engine.attention import AttentionBatch, attend
from engine.quantized_weights import ATTRIBUTE, fused_quantized

SUPPORTED_TYPES = frozenset({"llama", "mistral", "qwen2"})


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.nn.Module  # hidden -> (H + 2 KVH) * D
    o_proj: torch.nn.Module
    gate_up: torch.nn.Module  # hidden -> 2 * intermediate
    down: torch.nn.Module

    def __post_init__(self) -> None:
        # what forward calls: the kernels' unchecked row paths where the module has one (every
        # input here is fresh, contiguous 2-D rows), else the module
        for name in ("qkv", "o_proj", "gate_up", "down"):
            object.__setattr__(self, f"run_{name}", _rows_path(getattr(self, name)))

    run_qkv: Callable[[torch.Tensor], torch.Tensor] = field(init=False)
    run_o_proj: Callable[[torch.Tensor], torch.Tensor] = field(init=False)
    run_gate_up: Callable[[torch.Tensor], torch.Tensor] = field(init=False)
    run_down: Callable[[torch.Tensor], torch.Tensor] = field(init=False)


def _rows_path(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    rows: Callable[[torch.Tensor], torch.Tensor] | None = getattr(module, "rows", None)
    return rows if rows is not None else module


class LayerOpsLike(Protocol):
    """The small operations of a layer (see :class:`TorchLayerOps`)."""

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor: ...

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` rotated: use the result; ``x`` itself may or may not have been rotated."""
        ...

    def silu_mul(self, gate_up: torch.Tensor, intermediate: int) -> torch.Tensor: ...


class TorchLayerOps:
    """transformers' operations, op for op (any device and dtype)."""

    def add_rms_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """``x += delta`` in place (a + b == b + a, bit for bit), then RMSNorm of ``x``."""
        if delta is not None:
            x.add_(delta)
        return _rms_norm(x, weight, eps)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` (N, heads, D) rotated by ``cos`` and ``sin`` (N, D), in a new tensor."""
        return _rope(x, cos[:, None], sin[:, None])

    def silu_mul(self, gate_up: torch.Tensor, intermediate: int) -> torch.Tensor:
        return F.silu(gate_up[:, :intermediate]).mul_(gate_up[:, intermediate:])


def supports(model: torch.nn.Module) -> bool:
    """Whether :class:`LlamaForward` computes exactly what ``model`` computes."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_TYPES:
        return False
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "mlp_bias", False):
        return False
    inner = getattr(model, "model", None)
    return all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb"))


class LlamaForward:
    """Callable ``(input_ids (N,), positions (N,), batch, logits_index (S,)) -> logits (S, V)``.

    transformers' modules cost a decode step more than their arithmetic: dozens of small ops,
    module calls and mask construction per layer, on every step. Here q, k and v projections are
    fused into one matrix product, gate and up into another (on CPU in float32 the fused weights
    are packed once, see :mod:`engine.linear`); RoPE covers all heads in one pass; attention
    goes straight into :func:`engine.attention.attend` (no attention interface, no masks); only
    the tokens that sample get logits. The small ops are :class:`TorchLayerOps` (on CPU in
    float32 the C functions of :mod:`engine.kernels.layer_ops` do the same arithmetic in one
    call each). Rotary embeddings come from the model's own rotary module (every RoPE scaling
    type).
    """

    def __init__(
        self,
        model: Any,
        pack: Callable[[torch.nn.Module], torch.nn.Module],
        ops: LayerOpsLike | None = None,
    ) -> None:
        """``model``: a transformers ``*ForCausalLM`` that :func:`supports` accepts; ``pack``
        turns a linear layer into the one to run (e.g. pre-packed for CPU); ``ops`` runs the
        norms, RoPE and SiLU (default: :class:`TorchLayerOps`)."""
        self.ops: LayerOpsLike = ops or TorchLayerOps()
        inner = model.model
        config = model.config
        self.embed: torch.nn.Module = inner.embed_tokens
        self.rotary: torch.nn.Module = inner.rotary_emb
        self.final_norm: torch.Tensor = inner.norm.weight
        self.eps = float(inner.norm.variance_epsilon)
        self.lm_head = pack(model.lm_head)
        self._lm_head = _rows_path(self.lm_head)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(config.num_key_value_heads)
        first = inner.layers[0].self_attn
        self.head_dim = int(first.head_dim)
        self.scale = float(first.scaling)
        self.intermediate = int(inner.layers[0].mlp.gate_proj.out_features)
        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm.weight,
                post_norm=layer.post_attention_layernorm.weight,
                qkv=pack(_fuse(layer.self_attn, ("q_proj", "k_proj", "v_proj"))),
                o_proj=pack(layer.self_attn.o_proj),
                gate_up=pack(_fuse(layer.mlp, ("gate_proj", "up_proj"))),
                down=pack(layer.mlp.down_proj),
            )
            for layer in inner.layers[: config.num_hidden_layers]
        ]

    def __call__(
        self,
        input_ids: torch.Tensor,  # (N,)
        positions: torch.Tensor,  # (N,)
        batch: AttentionBatch,
        logits_index: torch.Tensor,  # (S,)
        layer_listener: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Logits of the tokens at ``logits_index``; ``layer_listener(i)`` runs as soon as layer
        i's K and V are in the cache."""
        ops = self.ops
        hidden = self.embed(input_ids)  # (N, hidden)
        cos, sin = self.rotary(hidden, positions[None])  # (1, N, D) each
        cos, sin = cos[0], sin[0]
        n = hidden.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        residual = hidden  # the embedding's output is ours: the residual adds go in place
        delta: torch.Tensor | None = None  # the last layer's MLP output, not yet added
        for index, layer in enumerate(self.layers):
            x = ops.add_rms_norm(residual, delta, layer.input_norm, self.eps)
            qkv = layer.run_qkv(x).view(n, h + 2 * kvh, d)
            qk = ops.rope(qkv[:, : h + kvh], cos, sin)  # (N, H + KVH, D)
            out = attend(
                batch,
                index,
                qk[:, :h].transpose(0, 1),
                qk[:, h:].transpose(0, 1),
                qkv[:, h + kvh :].transpose(0, 1),
                self.scale,
            )  # (N, H, D)
            if layer_listener is not None:
                layer_listener(index)
            x = ops.add_rms_norm(
                residual, layer.run_o_proj(out.view(n, h * d)), layer.post_norm, self.eps
            )
            delta = layer.run_down(ops.silu_mul(layer.run_gate_up(x), self.intermediate))
        if delta is not None:
            residual.add_(delta)
        last = ops.add_rms_norm(residual[logits_index], None, self.final_norm, self.eps)
        # a prefill chunk short of its prompt's end wants no logits: no rows for the kernel
        logits: torch.Tensor = self._lm_head(last) if last.shape[0] else self.lm_head(last)
        return logits


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op (variance in float32)."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin``, over all heads of ``x`` (N, heads, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def _fuse(parent: torch.nn.Module, names: tuple[str, ...]) -> torch.nn.Linear:
    """One linear layer computing ``parent``'s layers ``names`` side by side. The originals'
    weights (and biases) become views of the fused ones, so nothing is held twice; their
    quantized blocks (:mod:`engine.quantized_weights`), when all have them, are fused too."""
    parts = [getattr(parent, name) for name in names]
    quantized = fused_quantized(parts)
    weight = torch.cat([p.weight.detach() for p in parts])
    biases = [p.bias for p in parts]
    has_bias = any(b is not None for b in biases)
    fused = torch.nn.Linear(
        weight.shape[1], weight.shape[0], bias=has_bias, device="meta", dtype=weight.dtype
    )
    with torch.no_grad():
        fused.weight = torch.nn.Parameter(weight, requires_grad=False)
        if has_bias:
            bias = torch.cat(
                [
                    b.detach() if b is not None else weight.new_zeros(p.weight.shape[0])
                    for p, b in zip(parts, biases, strict=True)
                ]
            )
            fused.bias = torch.nn.Parameter(bias, requires_grad=False)
    offset = 0
    for part in parts:
        rows = part.weight.shape[0]
        part.weight = torch.nn.Parameter(fused.weight[offset : offset + rows], requires_grad=False)
        if part.bias is not None and fused.bias is not None:
            part.bias = torch.nn.Parameter(fused.bias[offset : offset + rows], requires_grad=False)
        offset += rows
    if quantized is not None:
        setattr(fused, ATTRIBUTE, quantized)
    return fused
