"""What the engine decides at start on CUDA, checked where it runs: ``--block-size auto`` takes
paged FlashAttention's 256, ``--kv-cache-memory 0.5`` sizes the pool from a profiled forward
pass and the process stays inside that share, and decode steps replay CUDA graphs (every
bucket captured) with the same tokens as without them and as transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from benchmarks.gpu_check_models import (
    build_random_model,
    generated,
    greedy_reference,
    load,
    make_engine,
    run_to_completion,
    sequence,
)
from engine.attention_varlen import (
    VARLEN_PAGE_MULTIPLE,
    AttentionBackend,
    choose_attention_backend,
    detect_varlen_support,
)
from engine.config import AUTO_BLOCK_SIZE, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.cuda_graphs import graph_buckets
from engine.engine import Engine
from tests.support.tiny_models import build_tiny_model

PROMPTS = [[5, 17, 99, 3, 250, 42, 7], list(range(10, 80)), [300, 301, 302]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"), "llama", 512, seed=2)


def _varlen_here(head_dim: int) -> bool:
    device = torch.device("cuda")
    support = detect_varlen_support(device)
    choice = choose_attention_backend(device, torch.bfloat16, 256, head_dim, support)
    return choice.backend is AttentionBackend.VARLEN


def test_auto_block_size_is_varlens_page_on_cuda(tiny: Path) -> None:
    model, spec = load(tiny, "bfloat16")
    config = EngineConfig(
        model=ModelConfig(model=str(spec.path)),
        cache=CacheConfig(block_size=AUTO_BLOCK_SIZE, num_blocks=32),
    )
    engine = Engine(config, model, spec, sink=lambda outputs: None)
    want = VARLEN_PAGE_MULTIPLE if _varlen_here(spec.head_dim) else 16
    assert engine.kv_cache.block_size == want
    assert (engine.runner.varlen is not None) == (want == VARLEN_PAGE_MULTIPLE)


def test_a_memory_fraction_is_sized_after_a_profiled_step(tmp_path: Path) -> None:
    folder = build_random_model(tmp_path / "default", "default", seed=0)
    model, spec = load(folder, "bfloat16")
    fraction = 0.5
    config = EngineConfig(
        model=ModelConfig(model=str(spec.path)),
        cache=CacheConfig(memory=str(fraction)),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=2048),
    )
    with capture_logs() as logs:
        engine = Engine(config, model, spec, sink=lambda outputs: None)
    profiled = [e for e in logs if e["event"] == "kv_memory_profiled"]
    assert len(profiled) == 1
    profile = profiled[0]
    print({k: profile[k] for k in ("total", "free", "resident", "activations", "budget")})
    assert profile["activations"] > 0 and profile["resident"] > 0
    share = fraction * profile["total"]
    assert profile["budget"] <= share - profile["resident"] - profile["activations"]
    # a worst-case step on the sized pool stays inside the share (graph pools included)
    torch.cuda.reset_peak_memory_stats()
    engine.add(sequence(spec, "long", [(7 * i) % 400 + 3 for i in range(2040)], 4))
    run_to_completion(engine)
    peak = torch.cuda.max_memory_allocated()
    print(f"peak {peak / 2**30:.2f} GiB of a {share / 2**30:.2f} GiB share")
    assert peak <= share + (256 << 20)


def test_decode_graphs_replay_with_the_tokens_of_eager_steps(tiny: Path) -> None:
    model, spec = load(tiny, "bfloat16")
    if not _varlen_here(spec.head_dim):
        pytest.skip("graphs capture the varlen path only; this torch or GPU has none")
    want = [greedy_reference(model, p, 16) for p in PROMPTS]
    outputs = {}
    for graphs in (True, False):
        engine = make_engine(model, spec, pool_tokens=8192, max_seqs=16, cuda_graphs=graphs)
        captured = engine.runner.graphs.captured if engine.runner.graphs else ()
        assert captured == (graph_buckets(16) if graphs else ())
        for i, prompt in enumerate(PROMPTS):  # 3 decoding rows: bucket 4, one padding row
            engine.add(sequence(spec, f"r{i}", prompt, 16))
        done = run_to_completion(engine)
        outputs[graphs] = [generated(done, f"r{i}") for i in range(len(PROMPTS))]
        engine.pool.check_integrity()
        assert engine.pool.num_free == engine.pool.num_blocks
    assert outputs[True] == outputs[False] == want
