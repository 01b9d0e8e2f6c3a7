"""Sizing the KV pool from a memory budget (``--kv-cache-memory``)."""

from __future__ import annotations

import torch

from engine.config import CacheConfig


def blocks_for_memory(cache: CacheConfig, bytes_per_token: int, device: torch.device) -> int:
    """``cache.num_blocks``, or as many blocks as ``cache.memory`` holds."""
    if cache.memory is None:
        return cache.num_blocks
    budget = parse_memory(cache.memory, device)
    blocks = budget // (bytes_per_token * cache.block_size)
    if blocks < 1:
        raise ValueError(f"--kv-cache-memory {cache.memory} holds no block of {cache.block_size}")
    return int(blocks)


_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_memory(text: str, device: torch.device) -> int:
    """Bytes from "4GiB", "512MiB", "123456", or a fraction of available memory ("0.3")."""
    value = text.strip().lower()
    for unit, scale in _UNITS.items():
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * scale)
    number = float(value)
    if 0 < number <= 1:
        return int(number * available_memory(device))
    return int(number)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("cannot read MemAvailable from /proc/meminfo")
