"""An engine's model runner, assembled from its config: the native kernels it takes, the
weights its linear layers compute from, its attention path and, on CUDA, its decode graphs
(:mod:`engine.native`, :mod:`engine.quantized_weights`, :mod:`engine.attention_varlen`,
:mod:`engine.cuda_graphs`)."""

from __future__ import annotations

import structlog
import torch

from engine.attention_varlen import (
    AttentionBackend,
    VarlenKernel,
    choose_attention_backend,
    detect_varlen_support,
    load_varlen_kernel,
)
from engine.config import DEFAULT_MODEL, EngineConfig, WeightsChoice
from engine.cuda_graphs import (
    DecodeGraphs,
    StaticDecodeBuffers,
    graph_buckets,
    padding_blocks,
    varlen_decode_step,
)
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
    kernel = load_attention_kernel(config, dtype, device)
    runner = ModelRunner(
        model,
        kv_cache,
        Sampler(),
        kernel,
        load_linear_kernel(config, dtype, device),
        load_layer_ops(config, dtype, device),
        grammars=grammars,
        weights=weights,
        quant=None if weights.choice is WeightsChoice.FLOAT else quant,
        varlen=_varlen_kernel(kv_cache, native_kernel=kernel is not None),
    )
    runner.graphs = decode_graphs(config, runner, model)
    return runner


def decode_graphs(
    config: EngineConfig, runner: ModelRunner, model: torch.nn.Module
) -> DecodeGraphs | None:
    """The runner's decode steps captured as CUDA graphs, one per batch-size bucket up to
    ``--max-num-seqs``; None off CUDA, with ``--no-cuda-graphs``, or where the step cannot
    be captured (logged: a model transformers' modules run, the gather attention path) or
    no bucket's capture succeeded. Padding rows write the KV tensor's last block, which
    :func:`engine.kv_memory.plan_kv_pool` set aside beyond the pool."""
    kv_cache = runner.kv_cache
    if not padding_blocks(config.cuda_graphs, kv_cache.device):
        return None
    if runner.fast is None or runner.varlen is None:
        why = "varlen FlashAttention off" if runner.fast else "not a Llama-family model"
        log.info("cuda_graphs_off", reason=f"{why}: decode steps run eagerly")
        return None
    bs = kv_cache.block_size
    max_len = config.model.max_model_len or getattr(model.config, "max_position_embeddings", 0)
    max_blocks = kv_cache.num_blocks - 1  # no sequence holds more than the pool
    if max_len:
        max_blocks = min(max_blocks, -(-int(max_len) // bs))
    buckets = graph_buckets(config.scheduler.max_num_seqs)
    buffers = StaticDecodeBuffers(
        max(buckets), max_blocks, bs, padding_block=kv_cache.num_blocks - 1, device=runner.device
    )
    graphs = DecodeGraphs(buffers, buckets)
    graphs.capture(varlen_decode_step(runner.fast, kv_cache, runner.varlen, max_blocks * bs))
    return graphs if graphs.captured else None


def _varlen_kernel(kv_cache: KVCache, native_kernel: bool) -> VarlenKernel | None:
    """The varlen FlashAttention kernel when this device, dtype and pool can use it (CUDA
    only); logs the attention path chosen and why either way."""
    device = kv_cache.device
    support = detect_varlen_support(device)
    choice = choose_attention_backend(
        device, kv_cache.dtype, kv_cache.block_size, kv_cache.head_dim, support, native_kernel
    )
    log.info(
        "attention_backend_chosen",
        backend=choice.backend.value,
        reason=choice.reason,
        block_size_needed=choice.block_size_needed,
    )
    if choice.backend is not AttentionBackend.VARLEN:
        return None
    return load_varlen_kernel()
