"""Sizing the KV pool (engine.kv_memory) on CPU: the CUDA budget's arithmetic from measured
numbers, the profiling forward pass through a tiny model with fake allocator statistics, the
CUDA branch of :func:`plan_kv_pool` with the profile stubbed, and the CPU branch
(MemAvailable, never a profile)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from engine import kv_memory
from engine.attention import register_paged_attention
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.kv_cache import KVCache
from engine.kv_memory import (
    MemoryProfile,
    blocks_for_budget,
    parse_bytes,
    parse_fraction,
    plan_kv_pool,
    pool_budget,
    profile_forward,
    profile_memory,
)
from tests.engine.tiny_engine import tiny_model

GIB = 1 << 30


def _profile(**fields: int) -> MemoryProfile:
    base = {"total": 80 * GIB, "free": 70 * GIB, "resident": 10 * GIB, "activations": 2 * GIB}
    return MemoryProfile(**{**base, **fields, "tokens": 2048})  # type: ignore[arg-type]


def test_the_budget_is_the_share_less_weights_and_activations() -> None:
    assert pool_budget(0.9, _profile()) == int(0.9 * 80 * GIB) - 10 * GIB - 2 * GIB


def test_the_budget_never_exceeds_free_memory_less_activations() -> None:
    # another process holds 50 GiB: the share would ask for more than is free
    assert pool_budget(0.9, _profile(free=20 * GIB)) == 18 * GIB


def test_a_budget_with_nothing_left_names_each_part() -> None:
    with pytest.raises(ValueError) as raised:
        pool_budget(0.1, _profile())
    text = str(raised.value)
    assert "--kv-cache-memory 0.1 leaves nothing" in text
    assert "8.00 GiB" in text and "10.00 GiB" in text and "2048-token" in text
    assert "2.00 GiB" in text and "--max-batched-tokens" in text


def test_blocks_in_a_budget_set_the_padding_block_aside() -> None:
    assert blocks_for_budget(10_000, 1_000, 0, "10000") == 10
    assert blocks_for_budget(10_000, 1_000, 1, "10000") == 9
    with pytest.raises(ValueError, match="holds no block of 1000 bytes"):
        blocks_for_budget(1_999, 1_000, 1, "1999")


@pytest.mark.parametrize(
    ("text", "fraction", "size"),
    [("0.3", 0.3, None), ("1", 1.0, None), ("4GiB", None, 4 * GIB), ("512MiB", None, 512 << 20)],
)
def test_fractions_and_bytes(text: str, fraction: float | None, size: int | None) -> None:
    assert parse_fraction(text) == fraction
    if size is not None:
        assert parse_bytes(text) == size
    assert parse_bytes("123456") == 123456 and parse_fraction("123456") is None


class FakeMemory:
    """Allocator statistics from a script: ``allocated`` answers in turn."""

    def __init__(self, allocated: list[int], peak: int, free: int, total: int) -> None:
        self.answers = list(allocated)
        self.peak_value, self.free, self.total = peak, free, total
        self.calls: list[str] = []

    def reset_peak(self) -> None:
        self.calls.append("reset_peak")

    def allocated(self) -> int:
        self.calls.append("allocated")
        return self.answers.pop(0)

    def peak(self) -> int:
        self.calls.append("peak")
        return self.peak_value

    def release(self) -> None:
        self.calls.append("release")

    def free_and_total(self) -> tuple[int, int]:
        return self.free, self.total


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, object]:
    model, spec = tiny_model(tmp_path_factory.mktemp("tiny"))
    model.set_attn_implementation(register_paged_attention())  # type: ignore[operator]
    return model, spec


def test_the_profile_runs_the_worst_case_step_and_reads_the_peak(tiny: tuple) -> None:
    model, spec = tiny
    seen: list[tuple[int, ...]] = []
    hook = model.model.embed_tokens.register_forward_hook(
        lambda module, args, out: seen.append(tuple(args[0].shape))
    )
    memory = FakeMemory(allocated=[1_000, 600], peak=1_700, free=5_000, total=9_000)
    scheduler = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=40)
    weights = next(model.parameters())
    try:
        profile = profile_memory(model, spec, scheduler, 4, weights, memory)
    finally:
        hook.remove()
    assert seen == [(1, 40)]  # one forward pass of max_num_batched_tokens tokens
    # peak reset before the step, read after it; the scratch cache freed before "resident"
    assert memory.calls == ["release", "reset_peak", "allocated", "peak", "release", "allocated"]
    assert profile == MemoryProfile(9_000, 5_000, 600, 700, 40)


def test_the_profile_splits_tokens_into_prompts_the_model_can_hold(tiny: tuple) -> None:
    model, spec = tiny
    cache = KVCache.for_model(spec, 16, 4, next(model.parameters()))
    positions: list[list[int]] = []
    hook = model.model.rotary_emb.register_forward_hook(
        lambda module, args, kwargs, out: positions.append(
            (args[1] if len(args) > 1 else kwargs["position_ids"])[0].tolist()
        ),
        with_kwargs=True,
    )
    try:
        probs = profile_forward(model, cache, tokens=50, max_len=20, rows=8)
    finally:
        hook.remove()
    assert positions == [[*range(20), *range(20), *range(10)]]  # no position past max_len
    assert probs.shape == (8, spec.vocab_size) and probs.dtype == torch.float32
    assert cache.kv[:, :, : -(-50 // 4)].abs().sum() > 0  # the step wrote its KV slots


def _weights_on(device: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A stand-in for the weights' tensor: plan_kv_pool reads its device and dtype."""
    return types.SimpleNamespace(device=torch.device(device), dtype=dtype)  # type: ignore[return-value]


def _spec(head_dim: int = 64) -> object:
    return types.SimpleNamespace(head_dim=head_dim, max_model_len=4096)


def test_cuda_fraction_profiles_then_sizes_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []

    def fake_profile(model, spec, scheduler, block_size, like, memory):  # type: ignore[no-untyped-def]
        asked.append(block_size)
        return MemoryProfile(100 * GIB, 90 * GIB, 4 * GIB, GIB, scheduler.max_num_batched_tokens)

    monkeypatch.setattr(kv_memory, "profile_memory", fake_profile)
    monkeypatch.setattr(kv_memory, "available_memory", lambda device: pytest.fail("no profile"))
    config = EngineConfig(cache=CacheConfig(memory="0.5"))
    per_token = 32 << 10
    with capture_logs() as logs:
        plan = plan_kv_pool(config, None, _spec(), per_token, _weights_on("cuda"))  # type: ignore[arg-type]
    block_bytes = per_token * plan.cache.block_size
    assert asked == [plan.cache.block_size]
    assert plan.cache.num_blocks == (50 * GIB - 4 * GIB - GIB) // block_bytes - 1
    assert plan.kv_blocks == plan.cache.num_blocks + 1  # the CUDA graphs' padding block
    events = {e["event"]: e for e in logs}
    assert events["kv_memory_profiled"]["activations"] == GIB
    assert events["kv_pool_sized"]["blocks"] == plan.cache.num_blocks


def test_cuda_fraction_that_leaves_nothing_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    profile = MemoryProfile(16 * GIB, 3 * GIB, 12 * GIB, 3 * GIB, 2048)
    monkeypatch.setattr(kv_memory, "profile_memory", lambda *args: profile)
    config = EngineConfig(cache=CacheConfig(memory="0.9"))
    with pytest.raises(ValueError, match="leaves nothing for the KV pool"):
        plan_kv_pool(config, None, _spec(), 1024, _weights_on("cuda"))  # type: ignore[arg-type]


def test_cpu_fraction_is_of_mem_available_without_a_profile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kv_memory, "profile_memory", lambda *args: pytest.fail("profiled"))
    monkeypatch.setattr(kv_memory, "available_memory", lambda device: 64 << 20)
    config = EngineConfig(cache=CacheConfig(memory="0.25", block_size=16))
    plan = plan_kv_pool(config, None, _spec(), 1024, _weights_on("cpu", torch.float32))  # type: ignore[arg-type]
    assert plan.cache.num_blocks == (16 << 20) // (1024 * 16)
    assert plan.kv_blocks == plan.cache.num_blocks  # no padding block on CPU


def test_bytes_size_the_pool_on_any_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_memory, "profile_memory", lambda *args: pytest.fail("profiled"))
    config = EngineConfig(cache=CacheConfig(memory="1MiB", block_size=16))
    cpu = plan_kv_pool(config, None, _spec(), 1024, _weights_on("cpu"))  # type: ignore[arg-type]
    assert (cpu.cache.num_blocks, cpu.kv_blocks) == (64, 64)
    cuda = plan_kv_pool(config, None, _spec(), 1024, _weights_on("cuda"))  # type: ignore[arg-type]
    assert (cuda.cache.num_blocks, cuda.kv_blocks) == (63, 64)  # the padding block inside it


def test_without_memory_num_blocks_stands(tmp_path: Path) -> None:
    config = EngineConfig(cache=CacheConfig(num_blocks=77, block_size=8), cuda_graphs=False)
    plan = plan_kv_pool(config, None, _spec(), 1024, _weights_on("cuda"))  # type: ignore[arg-type]
    assert (plan.cache.num_blocks, plan.kv_blocks, plan.cache.block_size) == (77, 77, 8)
