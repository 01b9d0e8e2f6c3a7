"""The model's and the engine's settings (flags and ``PDSERVE_*`` variables), declared once, and
the configuration built from them. Torch-free: the gateway and ``pdserve`` read the model's.

``MODEL`` is on every serving command (the gateway loads the tokenizer); ``ENGINE`` on the
worker tiers and ``pdserve up``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.settings import Group, Setting
from engine.config import (
    AUTO_BLOCK_SIZE,
    DEFAULT_MODEL,
    CacheConfig,
    DType,
    EngineConfig,
    KernelChoice,
    ModelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    SpeculativeMethod,
    WeightsChoice,
)

_KERNELS = [k.value for k in KernelChoice]


def block_size(text: str) -> int:
    """``--block-size``: "auto" (:data:`~engine.config.AUTO_BLOCK_SIZE`) or a positive number."""
    if text.strip().lower() == "auto":
        return AUTO_BLOCK_SIZE
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a block size: {text!r} (auto or N)") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"a block holds at least 1 slot, not {number}")
    return number


MODEL = Group(
    "model",
    (
        Setting(
            "--model",
            field="model",
            default=DEFAULT_MODEL,
            help=f"the default model ({DEFAULT_MODEL}), a local transformers folder (Llama, "
            "Qwen2, Mistral, GPT-2), or a hub id already in the local Hugging Face cache",
        ),
        Setting(
            "--dtype",
            choices=[d.value for d in DType],
            default="auto",
            help="weights and KV cache: auto (bfloat16 on CUDA, float32 on CPU), float32, "
            "bfloat16, float16; prefill and decode workers must end with the same one",
        ),
        Setting("--device", field="device", default="auto", help="auto, cpu, cuda, cuda:N"),
        Setting(
            "--cache-dir",
            type=Path,
            help="where the default model is converted once (~/.cache/pdserve)",
        ),
        Setting(
            "--max-model-len",
            type=int,
            help="cap on prompt + completion tokens (the model's context by default)",
        ),
    ),
)

ENGINE = Group(
    "engine",
    (
        Setting(
            "--block-size",
            field="cache.block_size",
            type=block_size,
            default=AUTO_BLOCK_SIZE,
            metavar="{auto,N}",
            format=lambda value: str(value or "auto"),
            help="token slots per KV block: auto (16 on CPU; 256 on CUDA where varlen "
            "FlashAttention runs, which reads pages of a multiple of 256, else 16; logged as "
            "kv_pool_sized) or a number; prefill and decode workers must end with the same one",
        ),
        Setting(
            "--num-blocks",
            field="cache.num_blocks",
            type=int,
            default=2048,
            help="KV blocks in this worker's pool",
        ),
        Setting(
            "--kv-cache-memory",
            field="cache.memory",
            help="size the KV pool from memory instead of --num-blocks: bytes (4GiB, 512MiB) "
            "or a fraction (0.9): on CUDA of the GPU's total memory, less the weights and the "
            "activations a profiling forward pass of --max-batched-tokens tokens peaks at; on "
            "CPU of MemAvailable at start",
        ),
        Setting(
            "--cpus",
            help="pin this worker to these CPU cores, e.g. 0 or 2,3 (default: no pinning)",
        ),
        Setting(
            "--no-prefix-caching",
            switch=True,
            help="do not reuse the KV of prompt prefixes computed before",
        ),
        Setting(
            "--no-cuda-graphs",
            switch=True,
            help="on CUDA, run decode steps eagerly instead of replaying CUDA graphs captured "
            "per batch-size bucket (1, 2, 4 ... up to --max-num-seqs); ignored off CUDA",
        ),
        Setting(
            "--max-num-seqs",
            field="scheduler.max_num_seqs",
            type=int,
            default=64,
            help="sequences in one batch at most",
        ),
        Setting(
            "--max-batched-tokens",
            field="scheduler.max_num_batched_tokens",
            type=int,
            default=2048,
            help="tokens in one forward pass at most (longer prompts are chunked)",
        ),
        Setting(
            "--speculative",
            choices=[m.value for m in SpeculativeMethod],
            default="off",
            help="speculative decoding on this worker's decoding sequences: ngram (prompt "
            "lookup: propose what followed the latest earlier occurrence of the last few "
            "tokens; no extra model), draft (a smaller model with the same tokenizer, "
            "--draft-model, proposes greedily), off. Output is unchanged: greedy and seeded "
            "requests produce the same tokens as without it",
        ),
        Setting(
            "--draft-model",
            field="speculative.draft_model",
            help="--speculative draft: the draft model (a local transformers folder with the "
            "target's tokenizer); its KV takes the target's block ids in the same pool",
        ),
        Setting(
            "--num-speculative-tokens",
            field="speculative.num_tokens",
            type=int,
            default=3,
            help="draft tokens per sequence and step at most (adapted to each sequence's "
            "recent acceptance)",
        ),
        Setting(
            "--prompt-lookup-min",
            field="speculative.ngram_min",
            type=int,
            default=2,
            help="ngram: the shortest trailing n-gram looked up",
        ),
        Setting(
            "--prompt-lookup-max",
            field="speculative.ngram_max",
            type=int,
            default=4,
            help="ngram: the longest trailing n-gram looked up (the longest match wins)",
        ),
        Setting(
            "--speculative-max-seqs",
            field="speculative.max_seqs",
            type=int,
            default=8,
            help="no speculation in a step with more decoding sequences than this",
        ),
        Setting("--threads", type=int, help="torch threads for this process"),
        Setting(
            "--engine-step-timeout",
            field="step_timeout_s",
            type=float,
            default=60.0,
            help="seconds the busy engine may go without progress (a step begun, a layer "
            "finished) before the worker declares it stalled: it turns NOT_SERVING, fails its "
            "calls UNAVAILABLE (the gateway retries them elsewhere) and exits with status 70 "
            "for its supervisor to restart it (0: never)",
        ),
        Setting(
            "--attention-kernel",
            choices=_KERNELS,
            default="auto",
            help="decode attention: native (a C kernel built here at first start, reads KV "
            "blocks in place; CPU), torch (gather + scaled-dot-product attention), auto "
            "(native where it applies and builds)",
        ),
        Setting(
            "--weights",
            choices=[w.value for w in WeightsChoice],
            default="auto",
            help="what linear layers compute from: gguf (the GGUF file's Q8_0/Q4_0/Q4_1 "
            "blocks, de-quantized inside the product to the same numbers as float; CPU with "
            "AVX2), int8 (float checkpoints quantized at load, per group of 32 inputs), float "
            "(the float weights), auto (as the model ships: gguf for the default model)",
        ),
        Setting(
            "--layer-kernels",
            choices=_KERNELS,
            default="auto",
            help="decoder layers outside attention, float32 on CPU: native (C kernels built "
            "here at first start: linear layers over weights packed once, RMSNorm, RoPE and "
            "SiLU one call each), torch (its operators; oneDNN for linear layers), auto (native "
            "where it applies and builds)",
        ),
    ),
)


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        **MODEL.fields(args),
        dtype=DType(args.dtype),
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        max_model_len=int(args.max_model_len) if args.max_model_len else None,
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=model_config(args),
        cache=CacheConfig(**ENGINE.fields(args, "cache")),
        scheduler=SchedulerConfig(
            **ENGINE.fields(args, "scheduler"), enable_prefix_caching=not args.no_prefix_caching
        ),
        speculative=SpeculativeConfig(
            method=SpeculativeMethod(args.speculative), **ENGINE.fields(args, "speculative")
        ),
        num_threads=int(args.threads) if args.threads else None,
        cpus=tuple(int(c) for c in str(args.cpus).split(",")) if args.cpus else None,
        attention_kernel=KernelChoice(args.attention_kernel),
        layer_kernels=KernelChoice(args.layer_kernels),
        weights=WeightsChoice(args.weights),
        cuda_graphs=not args.no_cuda_graphs,
        **ENGINE.fields(args),
    )
