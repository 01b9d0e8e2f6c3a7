"""Sizing the KV pool once the device is known: its block size (``--block-size``) and its
blocks (``--num-blocks``, or ``--kv-cache-memory``).

``--kv-cache-memory`` as a fraction means different things on the two devices:

- CUDA: as vLLM's ``gpu_memory_utilization``, the share of the GPU's *total* memory this
  worker may use. One profiling forward pass at the worst-case step (``max_num_batched_tokens``
  fresh prompt tokens, logits for ``max_num_seqs`` rows) runs first and measures its peak
  (``torch.cuda.max_memory_allocated``); the pool gets what is left::

      pool = fraction * total - resident (weights, buffers) - peak activations
      pool <= free after the profile - peak activations   (other processes' memory)

- CPU: the share of ``MemAvailable`` at start (no profile: a step's activations are small
  beside the host's memory, and the host has no allocator statistics to read).

Bytes ("4GiB") are the pool's own size on either device. The arithmetic is
:func:`pool_budget` and :func:`blocks_for_budget`, pure functions of the measured numbers.
"""

from __future__ import annotations

import gc
from dataclasses import replace
from typing import NamedTuple, Protocol

import structlog
import torch

from engine.attention import AttentionBatch, PrefillGroup
from engine.attention_varlen import choose_block_size, detect_varlen_support
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.cuda_graphs import padding_blocks
from engine.kv_cache import KVCache
from engine.model_files import ModelSpec

log = structlog.get_logger(__name__)

_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}
_GIB = float(1 << 30)


class PoolPlan(NamedTuple):
    cache: CacheConfig  # block_size and num_blocks resolved: what the pool hands out
    kv_blocks: int  # blocks of the KV tensor: the pool's and the CUDA graphs' padding block


class MemoryProfile(NamedTuple):
    """What one profiling forward pass found on the device (bytes)."""

    total: int  # the device's memory
    free: int  # free after the profile, torch's cache emptied (other processes' use counts)
    resident: int  # allocated by torch after it: weights and whatever else stays
    activations: int  # the step's peak above what was allocated before it
    tokens: int  # the step's tokens (max_num_batched_tokens)


def plan_kv_pool(
    config: EngineConfig,
    model: torch.nn.Module,
    spec: ModelSpec,
    bytes_per_token: int,
    weights: torch.Tensor,
) -> PoolPlan:
    """The pool of an engine whose ``model`` (paged attention set, not yet taken over by a
    runner) has ``weights``' device and dtype; ``bytes_per_token``: KV of one token, a draft
    model's included. Logs ``kv_pool_sized``. ValueError when the budget holds no block."""
    device = weights.device
    support = detect_varlen_support(device)
    choice = choose_block_size(
        config.cache.block_size, device, weights.dtype, spec.head_dim, support
    )
    cache = replace(config.cache, block_size=choice.block_size)
    padding = padding_blocks(config.cuda_graphs, device)
    block_bytes = bytes_per_token * cache.block_size
    blocks = cache.num_blocks
    if cache.memory is not None:
        fraction = parse_fraction(cache.memory)
        if fraction is None:
            budget = parse_bytes(cache.memory)
        elif device.type != "cuda":
            budget = int(fraction * available_memory(device))
        else:
            memory = CudaMemory(device)
            profile = profile_memory(
                model, spec, config.scheduler, cache.block_size, weights, memory
            )
            budget = pool_budget(fraction, profile)
            log.info("kv_memory_profiled", budget=budget, **profile._asdict())
        blocks = blocks_for_budget(budget, block_bytes, padding, cache.memory)
    log.info(
        "kv_pool_sized",
        blocks=blocks,
        block_size=cache.block_size,
        block_size_reason=choice.reason,
        padding_blocks=padding,
        bytes=(blocks + padding) * block_bytes,
    )
    return PoolPlan(replace(cache, num_blocks=blocks), blocks + padding)


def pool_budget(fraction: float, profile: MemoryProfile) -> int:
    """Bytes for the pool on CUDA (see the module's formula). ValueError naming each part
    when nothing is left."""
    activations = profile.activations
    share = int(fraction * profile.total)
    budget = min(share - profile.resident - activations, profile.free - activations)
    if budget > 0:
        return budget
    raise ValueError(
        f"--kv-cache-memory {fraction:g} leaves nothing for the KV pool: {fraction:g} of "
        f"{profile.total / _GIB:.2f} GiB is {share / _GIB:.2f} GiB, of which weights and other "
        f"resident tensors take {profile.resident / _GIB:.2f} GiB and a {profile.tokens}-token "
        f"step's activations {activations / _GIB:.2f} GiB ({profile.free / _GIB:.2f} GiB free "
        "after them); raise the fraction, lower --max-batched-tokens, or give bytes"
    )


def blocks_for_budget(budget: int, block_bytes: int, padding: int, asked: str) -> int:
    """The pool's blocks in ``budget`` bytes once ``padding`` blocks are set aside."""
    blocks = budget // block_bytes - padding
    if blocks < 1:
        raise ValueError(
            f"--kv-cache-memory {asked} ({budget} bytes) holds no block of {block_bytes} bytes"
        )
    return int(blocks)


def parse_fraction(text: str) -> float | None:
    """The fraction "0.3" asks for (0 < f <= 1), or None for bytes ("4GiB", "123456")."""
    value = text.strip().lower()
    if any(value.endswith(unit) for unit in _UNITS):
        return None
    number = float(value)
    return number if 0 < number <= 1 else None


def parse_bytes(text: str) -> int:
    """Bytes from "4GiB", "512MiB", "1.5GB" or "123456"."""
    value = text.strip().lower()
    for unit, scale in _UNITS.items():
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * scale)
    return int(float(value))


def available_memory(device: torch.device) -> int:
    """Free memory now: the GPU's (``mem_get_info``), else the host's ``MemAvailable``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("cannot read MemAvailable from /proc/meminfo")


class DeviceMemory(Protocol):
    """The allocator statistics a profile reads (:class:`CudaMemory`; a fake in tests)."""

    def reset_peak(self) -> None: ...
    def allocated(self) -> int: ...
    def peak(self) -> int: ...
    def release(self) -> None: ...
    def free_and_total(self) -> tuple[int, int]: ...


class CudaMemory:
    """:class:`DeviceMemory` of one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return int(torch.cuda.memory_allocated(self.device))

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()

    def free_and_total(self) -> tuple[int, int]:
        free, total = torch.cuda.mem_get_info(self.device)
        return int(free), int(total)


def profile_memory(
    model: torch.nn.Module,
    spec: ModelSpec,
    scheduler: SchedulerConfig,
    block_size: int,
    like: torch.Tensor,
    memory: DeviceMemory,
) -> MemoryProfile:
    """Run :func:`profile_forward` at the worst-case step over a scratch KV cache just large
    enough for it (allocated before the peak is reset, freed after: it is KV, not
    activations) and read what it took."""
    tokens = scheduler.max_num_batched_tokens
    scratch = KVCache.for_model(spec, -(-tokens // block_size), block_size, like)
    memory.release()
    memory.reset_peak()
    before = memory.allocated()
    rows = min(tokens, scheduler.max_num_seqs)
    profile_forward(model, scratch, tokens, spec.max_model_len, rows)
    activations = max(0, memory.peak() - before)
    del scratch
    memory.release()
    resident = memory.allocated()
    free, total = memory.free_and_total()
    return MemoryProfile(total, free, resident, activations, tokens)


@torch.inference_mode()
def profile_forward(
    model: torch.nn.Module, cache: KVCache, tokens: int, max_len: int, rows: int
) -> torch.Tensor:
    """One forward pass of ``tokens`` fresh prompt tokens (prompts of at most ``max_len``),
    through the model's paged attention into ``cache`` (slots 0 .. tokens - 1), with logits
    for the last ``rows`` and what the sampler makes of them at most (float32 probabilities
    and their sort, as top-p takes them). transformers' modules run it, not the runner's fused
    path (the runner does not exist yet): the same matrix products and attention, so the same
    order of peak. Returns the probabilities ``(rows, V)``."""
    lengths = [min(max_len, tokens - start) for start in range(0, tokens, max_len)]
    dev = cache.device
    positions = torch.cat([torch.arange(n) for n in lengths]).to(dev)  # (N,)
    batch = AttentionBatch(
        kv_cache=cache,
        slot_mapping=torch.arange(tokens, device=dev),
        decode=(),
        prefill=PrefillGroup(0, tuple(lengths), None, None, None),  # fresh prompts
        native=None,
        workspace=torch.empty(0, dtype=cache.dtype, device=dev),
    )
    out = model(
        input_ids=torch.ones((1, tokens), dtype=torch.long, device=dev),  # not 0: often padding
        position_ids=positions[None],
        use_cache=False,
        logits_to_keep=torch.arange(tokens - rows, tokens, device=dev),
        pdserve_batch=batch,
    )
    probs = torch.softmax(out.logits[0].float(), dim=-1)  # (rows, V)
    probs.sort(dim=-1, descending=True)
    return probs
