"""Flag groups the tier commands share, and the configuration objects built from them.

Every flag can also come from the environment as ``PDSERVE_<FLAG>``; argparse applies the
flag's type to either. Configuration is built here, once per entry point, and passed down.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from engine.config import (
    DEFAULT_MODEL,
    CacheConfig,
    DType,
    EngineConfig,
    KernelChoice,
    ModelConfig,
    SchedulerConfig,
)
from kvtransfer.config import Streaming, TransferConfig
from kvtransfer.datapath import Backend

ENV_PREFIX = "PDSERVE_"


def env_default(flag: str, default: Any) -> Any:
    """``PDSERVE_<FLAG>`` or ``default``; argparse applies the flag's type to either."""
    return os.environ.get(ENV_PREFIX + flag.upper().replace("-", "_"), default)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=env_default("model", DEFAULT_MODEL),
        help=f"the default model ({DEFAULT_MODEL}), a local transformers folder (Llama, Qwen2, "
        "Mistral, GPT-2), or a hub id already in the local Hugging Face cache",
    )
    g.add_argument(
        "--dtype", choices=[d.value for d in DType], default=env_default("dtype", "float32")
    )
    g.add_argument(
        "--device", default=env_default("device", "auto"), help="auto, cpu, cuda, cuda:N"
    )
    g.add_argument(
        "--cache-dir",
        type=Path,
        default=env_default("cache_dir", None),
        help="where the default model is converted once (~/.cache/pdserve)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=env_default("max_model_len", None),
        help="cap on prompt + completion tokens (the model's context by default)",
    )


def add_log_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default=env_default("log_level", "info"))
    p.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default=env_default("log_format", "auto"),
        help="json lines, console text, or auto (console on a terminal)",
    )


def add_metrics_flag(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument(
        "--metrics-port",
        type=int,
        default=env_default("metrics_port", default),
        help="port of the Prometheus /metrics endpoint (0: off)",
    )


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--block-size",
        type=int,
        default=env_default("block_size", 16),
        help="token slots per KV block",
    )
    g.add_argument(
        "--num-blocks",
        type=int,
        default=env_default("num_blocks", 2048),
        help="KV blocks in this worker's pool",
    )
    g.add_argument(
        "--kv-cache-memory",
        default=env_default("kv_cache_memory", None),
        help="size the KV pool from memory instead of --num-blocks: bytes (4GiB, 512MiB) or "
        "a fraction of the memory available at start (0.3)",
    )
    g.add_argument(
        "--cpus",
        default=env_default("cpus", None),
        help="pin this worker to these CPU cores, e.g. 0 or 2,3 (default: no pinning)",
    )
    g.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not reuse the KV of prompt prefixes computed before",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=env_default("max_num_seqs", 64),
        help="sequences in one batch at most",
    )
    g.add_argument(
        "--max-batched-tokens",
        type=int,
        default=env_default("max_batched_tokens", 2048),
        help="tokens in one forward pass at most (longer prompts are chunked)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=env_default("threads", None),
        help="torch threads for this process",
    )
    g.add_argument(
        "--attention-kernel",
        choices=[k.value for k in KernelChoice],
        default=env_default("attention_kernel", "auto"),
        help="decode attention: native (a C kernel built here at first start, reads KV blocks "
        "in place; CPU), torch (gather + scaled-dot-product attention), auto (native where it "
        "applies and builds)",
    )
    g.add_argument(
        "--layer-kernels",
        choices=[k.value for k in KernelChoice],
        default=env_default("layer_kernels", "auto"),
        help="decoder layers outside attention, float32 on CPU: native (C kernels built here at "
        "first start: linear layers over weights packed once, RMSNorm, RoPE and SiLU "
        "one call each), torch (its operators; oneDNN for linear layers), auto (native where "
        "it applies and builds)",
    )


def add_transfer_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV transfer")
    g.add_argument(
        "--kv-backend",
        choices=[b.value for b in Backend],
        default=env_default("kv_backend", "zmq"),
        help="how page bytes move: zmq (in ZeroMQ frames, tcp/ipc), stream (ZeroMQ control, "
        "pages over a direct socket read straight into the KV pool: fastest on CPU), gloo "
        "(torch.distributed, CPU), nccl (torch.distributed, GPU); both tiers must agree",
    )
    g.add_argument(
        "--kv-streaming",
        choices=[s.value for s in Streaming],
        default=env_default("kv_streaming", "layerwise"),
        help="push each layer's pages as it is computed, or all after the prefill",
    )
    g.add_argument(
        "--kv-key-file",
        type=Path,
        default=env_default("kv_key_file", None),
        help="file holding the fleet's KV channel secret (or set PDSERVE_KV_KEY); "
        "every frame is MACed with it",
    )
    g.add_argument(
        "--kv-insecure",
        action="store_true",
        help="run the KV channel without a key (local development only)",
    )
    g.add_argument(
        "--no-kv-checksum",
        action="store_true",
        help="without a key, skip the per-frame XXH3-64 checksum",
    )
    g.add_argument(
        "--kv-max-queued-mb",
        type=int,
        default=env_default("kv_max_queued_mb", 512),
        help="pages queued per decode peer before the prefill worker waits",
    )
    g.add_argument(
        "--kv-ack-timeout",
        type=float,
        default=env_default("kv_ack_timeout", 30.0),
        help="seconds a transfer may wait for its acknowledgement",
    )


def transfer_config(args: argparse.Namespace) -> TransferConfig:
    key = os.environ.get(ENV_PREFIX + "KV_KEY")
    if args.kv_key_file:
        key = Path(args.kv_key_file).read_text().strip()
    return TransferConfig(
        backend=Backend(args.kv_backend),
        key=key.encode() if key else None,
        insecure=args.kv_insecure,
        checksum=not args.no_kv_checksum,
        streaming=Streaming(args.kv_streaming),
        max_queued_bytes=int(args.kv_max_queued_mb) << 20,
        ack_timeout_s=float(args.kv_ack_timeout),
    )


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        model=args.model,
        dtype=DType(args.dtype),
        device=args.device,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        max_model_len=int(args.max_model_len) if args.max_model_len else None,
    )


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=model_config(args),
        cache=CacheConfig(
            block_size=args.block_size, num_blocks=args.num_blocks, memory=args.kv_cache_memory
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_batched_tokens,
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        num_threads=int(args.threads) if args.threads else None,
        cpus=tuple(int(c) for c in str(args.cpus).split(",")) if args.cpus else None,
        attention_kernel=KernelChoice(args.attention_kernel),
        layer_kernels=KernelChoice(args.layer_kernels),
    )
