"""The engine on tiny random models, in-process: greedy output stays token-identical to
transformers under chunked prefill, preemption, mixed batches and KV export/import."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.errors import OutOfBlocksError
from core.sampling import FinishReason, SamplingParams
from engine.config import (
    CacheConfig,
    DType,
    EngineConfig,
    KernelChoice,
    ModelConfig,
    SchedulerConfig,
)
from engine.engine import Engine, RequestOutput
from engine.kernels import LayerOps
from engine.linear import NativeLinear
from engine.model_loader import load_model
from engine.sequence import Sequence
from tests.support.tiny_models import build_tiny_model

PROMPTS = [
    [5, 17, 99, 3, 250, 42, 7],
    list(range(10, 80)),
    [300, 301, 302],
    [int(x) for x in torch.randint(3, 500, (45,), generator=torch.Generator().manual_seed(3))],
]
MAX_TOKENS = [12, 20, 7, 30]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), request.param, 512, seed=2)
    model, spec = load_model(ModelConfig(model=str(path)))
    expected = []
    ref = model  # transformers' own attention before the engine switches it to paged attention
    with torch.inference_mode():
        for prompt, n in zip(PROMPTS, MAX_TOKENS, strict=True):
            ids = torch.tensor([prompt])
            out = ref.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                do_sample=False,
                top_k=None,
                top_p=None,
                temperature=None,
            )
            expected.append(out[0, len(prompt) :].tolist())
    return model, spec, expected


def _engine(
    model, spec, *, num_blocks=256, block_size=4, budget=2048, kernels=KernelChoice.AUTO
) -> Engine:
    config = EngineConfig(
        model=ModelConfig(model=str(spec.path)),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget),
        attention_kernel=kernels,
        layer_kernels=kernels,
    )
    return Engine(config, model, spec, sink=lambda outputs: None)


def _seq(spec, i: int, prompt: list[int], n: int) -> Sequence:
    return Sequence(
        f"r{i}",
        list(prompt),
        len(prompt),
        SamplingParams(max_tokens=n, temperature=0),
        spec.eos_token_ids,
    )


def _run_to_completion(engine: Engine, steps_limit: int = 2000) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    for _ in range(steps_limit):
        if not engine.scheduler.has_work():
            return outputs
        outputs.extend(engine.step())
    raise AssertionError("engine did not finish")


def _generated(outputs: list[RequestOutput], request_id: str) -> list[int]:
    return [t for o in outputs if o.request_id == request_id for t in o.token_ids]


@pytest.mark.parametrize(
    "kernels", [KernelChoice.NATIVE, KernelChoice.TORCH], ids=lambda k: k.value
)
@pytest.mark.parametrize(
    ("budget", "num_blocks"),
    [(2048, 256), (16, 256), (5, 256), (64, 24)],
    ids=["one-shot", "chunked-16", "chunked-5", "preempting"],
)
def test_greedy_matches_transformers(tiny, budget: int, num_blocks: int, kernels: KernelChoice):
    model, spec, expected = tiny
    engine = _engine(model, spec, budget=budget, num_blocks=num_blocks, kernels=kernels)
    native = kernels is KernelChoice.NATIVE
    assert (engine.runner.kernel is not None) == native
    # Llama and Qwen2 run pdserve's own forward pass, GPT-2 transformers' modules
    assert (engine.runner.fast is not None) == (spec.family != "gpt2")
    if engine.runner.fast is not None:
        assert isinstance(engine.runner.fast.lm_head, NativeLinear) == native
        assert isinstance(engine.runner.fast.ops, LayerOps) == native
    for i, (prompt, n) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True)):
        engine.add(_seq(spec, i, prompt, n))
    outputs = _run_to_completion(engine)
    for i, want in enumerate(expected):
        assert _generated(outputs, f"r{i}") == want, f"request {i}"
    if num_blocks == 24:
        assert engine.scheduler.num_preemptions > 0, "the small pool should have forced preemption"
    engine.pool.check_integrity()
    assert engine.pool.num_free == num_blocks


def test_sequences_join_and_leave_mid_batch(tiny):
    model, spec, expected = tiny
    engine = _engine(model, spec)
    engine.add(_seq(spec, 0, PROMPTS[0], MAX_TOKENS[0]))
    outputs = [*engine.step(), *engine.step(), *engine.step()]
    engine.add(_seq(spec, 1, PROMPTS[1], MAX_TOKENS[1]))  # joins a running batch
    outputs += engine.step()
    engine.add(_seq(spec, 2, PROMPTS[2], MAX_TOKENS[2]))
    outputs += _run_to_completion(engine)
    for i in range(3):
        assert _generated(outputs, f"r{i}") == expected[i]
    assert engine.pool.num_free == engine.pool.num_blocks


def test_exported_kv_continues_on_another_engine(tiny):
    """The prefill/decode split in one process: export pages, scatter them into a reserved
    sequence of a second engine, continue decoding there; output is unchanged."""
    model, spec, expected = tiny
    prefill = _engine(model, spec, num_blocks=64)
    decode = _engine(model, spec, num_blocks=64)
    for i, (prompt, n) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True)):
        prefill.add(_seq(spec, i, prompt, n), export_kv=True)
    exported = {o.request_id: o for o in _run_to_completion(prefill)}
    assert prefill.pool.num_free == prefill.pool.num_blocks
    for i, (prompt, n) in enumerate(zip(PROMPTS, MAX_TOKENS, strict=True)):
        out = exported[f"r{i}"]
        assert out.pages is not None and out.finish_reason is None
        seq = _seq(spec, i, prompt, n)
        block_ids = list(decode.reserve_import(seq).block_ids)
        decode.kv_cache.scatter_pages(block_ids, out.pages)
        decode.kv_ready(seq.request_id, out.token_ids[0])
    outputs = _run_to_completion(decode)
    for i, want in enumerate(expected):
        assert [exported[f"r{i}"].token_ids[0], *_generated(outputs, f"r{i}")] == want
    assert decode.pool.num_free == decode.pool.num_blocks


def test_abort_frees_blocks_in_every_state(tiny):
    model, spec, _ = tiny
    engine = _engine(model, spec, budget=8)
    engine.add(_seq(spec, 0, PROMPTS[1], 50))  # long prompt: still waiting after one chunk
    engine.add(_seq(spec, 1, PROMPTS[0], 50))
    reserved = _seq(spec, 2, PROMPTS[2], 5)
    engine.reserve_import(reserved)
    engine.step()
    for rid in ("r0", "r1", "r2"):
        engine.abort(rid)
    assert not engine.scheduler.has_work() and not engine.scheduler.awaiting_kv
    engine.pool.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_request_larger_than_the_pool_is_refused(tiny):
    model, spec, _ = tiny
    engine = _engine(model, spec, num_blocks=8, block_size=4)
    with pytest.raises(OutOfBlocksError, match="needs 10 KV blocks"):
        engine.add(_seq(spec, 0, list(range(3, 33)), 10))
    with pytest.raises(OutOfBlocksError):
        engine.reserve_import(_seq(spec, 1, list(range(3, 33)), 10))
    assert engine.pool.num_free == 8


def test_stop_token_and_length_finish(tiny):
    model, spec, expected = tiny
    engine = _engine(model, spec)
    stop_at = expected[1][3]
    seq = Sequence(
        "s",
        list(PROMPTS[1]),
        len(PROMPTS[1]),
        SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(stop_at,)),
        spec.eos_token_ids,
    )
    engine.add(seq)
    outputs = _run_to_completion(engine)
    tokens = _generated(outputs, "s")
    assert tokens == expected[1][: expected[1].index(stop_at) + 1]
    assert outputs[-1].finish_reason is FinishReason.STOP


def test_seeded_sampling_is_reproducible(tiny):
    model, spec, _ = tiny
    params = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    runs = []
    for budget in (2048, 3):  # a different batch shape must not change seeded output
        engine = _engine(model, spec, budget=budget)
        engine.add(Sequence("x", list(PROMPTS[0]), len(PROMPTS[0]), params, frozenset()))
        engine.add(_seq(spec, 9, PROMPTS[1], 10))
        runs.append(_generated(_run_to_completion(engine), "x"))
    assert runs[0] == runs[1] and len(runs[0]) == 15


def test_dtype_bfloat16_runs(tmp_path: Path):
    path = build_tiny_model(tmp_path / "m", "llama", 512, seed=2)
    model, spec = load_model(ModelConfig(model=str(path), dtype=DType.BFLOAT16))
    engine = _engine(model, spec)
    assert engine.kv_cache.dtype is torch.bfloat16
    engine.add(_seq(spec, 0, PROMPTS[0], 5))
    assert len(_generated(_run_to_completion(engine), "r0")) == 5


@pytest.mark.parametrize("budget", [2048, 16], ids=["one-shot", "chunked"])
def test_layer_sink_streams_each_layer_once_with_the_same_pages(tiny, budget: int):
    """Layer-wise export hands over exactly the pages an after-prefill export would, each layer
    once and in order, during the step that completes the prompt."""
    model, spec, _ = tiny
    streamed: list[tuple[str, int, torch.Tensor]] = []
    layerwise = _engine(model, spec, budget=budget)
    layerwise.set_layer_sink(lambda key, layer, pages: streamed.append((key, layer, pages)))
    whole = _engine(model, spec, budget=budget)
    for engine in (layerwise, whole):
        engine.add(_seq(spec, 1, PROMPTS[1], 5), export_kv=True)
        engine.add(_seq(spec, 3, PROMPTS[3], 5), export_kv=True)
    streamed_out = {o.request_id: o for o in _run_to_completion(layerwise)}
    whole_out = {o.request_id: o for o in _run_to_completion(whole)}
    for rid in ("r1", "r3"):
        assert streamed_out[rid].pages is None  # already streamed
        assert streamed_out[rid].token_ids == whole_out[rid].token_ids
        layers = [(layer, pages) for key, layer, pages in streamed if key == rid]
        assert [layer for layer, _ in layers] == list(range(spec.num_layers))
        pages = torch.cat([p for _, p in layers])  # (L, 2, n, bs, KVH, D)
        expected = whole_out[rid].pages
        assert expected is not None and torch.equal(pages, expected)
    assert layerwise.pool.num_free == layerwise.pool.num_blocks
