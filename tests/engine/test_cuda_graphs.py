"""engine.cuda_graphs on CPU: buckets, padding into static buffers, the setting, that nothing
graph-related is made off CUDA, and the runner's side with the graph emulated (a replay
recomputes the captured step on its buffers): decode rows in the eager step's packed order,
replayed logits equal to the eager step's, the steps a graph never takes, and a failed capture
logged and left to run eagerly."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch
from structlog.testing import capture_logs

from core.sampling import SamplingParams
from core.settings import add_settings
from engine.config import CacheConfig, EngineConfig, ModelConfig
from engine.cuda_graphs import (
    DEFAULT_BUCKETS,
    Captured,
    DecodeGraphs,
    DecodeMetadata,
    DecodeTensors,
    StaticDecodeBuffers,
    choose_bucket,
    decode_metadata,
    graph_buckets,
    padding_blocks,
    varlen_decode_step,
)
from engine.engine import Engine
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner
from engine.runner_setup import decode_graphs
from engine.sampler import Sampler
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence
from engine.settings import ENGINE, MODEL, engine_config
from tests.engine.test_attention_varlen import reference_varlen_attn
from tests.engine.tiny_engine import tiny_model

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("max_num_seqs", "expected"),
    [
        (64, DEFAULT_BUCKETS),
        (48, (1, 2, 4, 8, 16, 32, 48)),
        (8, (1, 2, 4, 8)),
        (1, (1,)),
        (3, (1, 2, 3)),
        (256, DEFAULT_BUCKETS),  # batches above 64 run eagerly
    ],
)
def test_buckets_are_capped_by_max_num_seqs(max_num_seqs: int, expected: tuple[int, ...]) -> None:
    assert graph_buckets(max_num_seqs) == expected


def test_no_buckets_for_no_sequences() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        graph_buckets(0)


@pytest.mark.parametrize(
    ("batch", "bucket"),
    [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 32), (33, 64), (64, 64), (65, None), (0, None)],
)
def test_the_smallest_bucket_that_holds_the_batch(batch: int, bucket: int | None) -> None:
    assert choose_bucket(DEFAULT_BUCKETS, batch, has_prefill=False) == bucket


def test_a_batch_with_prefill_runs_eagerly() -> None:
    assert choose_bucket(DEFAULT_BUCKETS, 3, has_prefill=True) is None


def _buffers(max_batch: int = 8) -> StaticDecodeBuffers:
    return StaticDecodeBuffers(max_batch, max_blocks=4, block_size=16, padding_block=99, device=CPU)


META = DecodeMetadata(
    input_ids=[11, 12, 13],
    positions=[5, 20, 0],
    slot_mapping=[3 * 16 + 5, 7 * 16 + 4, 9 * 16],
    block_tables=[[3], [1, 7], [9]],
    seq_lens=[6, 21, 1],
)


def test_metadata_is_padded_into_the_static_buffers() -> None:
    buffers = _buffers()
    before = buffers.input_ids.data_ptr()
    view = buffers.fill(META, bucket=4)
    assert view.input_ids.tolist() == [11, 12, 13, 0]
    assert view.positions.tolist() == [5, 20, 0, 0]
    assert view.slot_mapping.tolist() == [53, 116, 144, 99 * 16]  # padding writes block 99
    assert view.block_tables.tolist() == [
        [3, 99, 99, 99],
        [1, 7, 99, 99],
        [9, 99, 99, 99],
        [99, 99, 99, 99],
    ]
    assert view.seq_lens.tolist() == [6, 21, 1, 1]  # padding attends to one slot
    assert buffers.input_ids.data_ptr() == before  # in place: a graph's inputs stay put
    assert view.input_ids.data_ptr() == before
    assert (view.input_ids.dtype, view.block_tables.dtype) == (torch.long, torch.int32)


def test_a_refill_overwrites_the_last_step() -> None:
    buffers = _buffers()
    buffers.fill(META, bucket=4)
    one = DecodeMetadata([7], [2], [33], [[2]], [3])
    view = buffers.fill(one, bucket=1)
    assert view.input_ids.tolist() == [7] and view.block_tables.tolist() == [[2, 99, 99, 99]]


def test_metadata_that_does_not_fit_is_refused() -> None:
    buffers = _buffers(max_batch=2)
    assert not buffers.fits(META)
    with pytest.raises(ValueError, match="do not fit"):
        buffers.fill(META, bucket=4)
    long_table = DecodeMetadata([1], [0], [0], [[1, 2, 3, 4, 5]], [1])
    assert not _buffers().fits(long_table)
    with pytest.raises(ValueError, match="differ in length"):
        _buffers().fill(DecodeMetadata([1, 2], [0], [0], [[1]], [1]), bucket=2)
    with pytest.raises(ValueError, match="do not fit"):
        _buffers().fill(META, bucket=2)  # the bucket is smaller than the batch


def test_on_cpu_nothing_graph_related_is_created(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[str] = []
    for name in ("CUDAGraph", "Stream", "graph_pool_handle", "graph"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name, **k: made.append(_n))
    graphs = DecodeGraphs(_buffers(), DEFAULT_BUCKETS)
    assert not graphs.available()
    calls: list[int] = []

    def step(inputs: DecodeTensors) -> torch.Tensor:
        calls.append(len(inputs.input_ids))
        return torch.zeros(1)

    graphs.capture(step)
    assert (made, calls, graphs.captured) == ([], [], ())
    assert graphs.replay(META) is None  # run eagerly
    assert made == []


def test_graphs_turned_off_are_never_available() -> None:
    graphs = DecodeGraphs(_buffers(), DEFAULT_BUCKETS, enabled=False)
    assert not graphs.available()
    assert graphs.buckets == (1, 2, 4, 8)  # capped by the buffers' rows


def _config(argv: list[str]) -> EngineConfig:
    parser = argparse.ArgumentParser()
    add_settings(parser, MODEL, ENGINE)
    return engine_config(parser.parse_args(argv))


def test_the_setting_defaults_to_graphs_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_NO_CUDA_GRAPHS", raising=False)
    assert _config([]).cuda_graphs is True
    assert EngineConfig().cuda_graphs is True


def test_the_flag_turns_graphs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDSERVE_NO_CUDA_GRAPHS", raising=False)
    assert _config(["--no-cuda-graphs"]).cuda_graphs is False


@pytest.mark.parametrize(("value", "on"), [("1", False), ("true", False), ("0", True)])
def test_the_variable_turns_graphs_off(
    value: str, on: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDSERVE_NO_CUDA_GRAPHS", value)
    assert _config([]).cuda_graphs is on


def test_the_setting_is_declared_once() -> None:
    flags = [s.flag for s in ENGINE if "cuda-graphs" in s.flag]
    assert flags == ["--no-cuda-graphs"]


# -- the runner's side: decode rows, the captured step, capture failures, CPU -----------------


def test_graphs_pad_with_one_block_beyond_the_pool_on_cuda_only() -> None:
    assert padding_blocks(True, torch.device("cuda")) == 1
    assert padding_blocks(False, torch.device("cuda")) == 0
    assert padding_blocks(True, CPU) == 0


BS = 4


def _seq(rid: str, computed: int, table: list[int], export: bool = False) -> Sequence:
    tokens = [(7 * i + len(rid)) % 500 + 3 for i in range(computed + 4)]
    seq = Sequence(rid, tokens, 2, SamplingParams())
    seq.block_table = list(table)
    seq.num_computed_tokens = computed
    seq.export_kv = export
    return seq


def _decode_batch() -> ScheduledBatch:
    """Three decoding sequences, not in context order; the middle one has a spare block."""
    return ScheduledBatch(
        (
            ScheduledSeq(_seq("a", 9, [4, 2, 7]), 1, True),  # position 9: block 7
            ScheduledSeq(_seq("bb", 2, [5, 11]), 1, True),  # position 2: block 5 (11 spare)
            ScheduledSeq(_seq("ccc", 9, [1, 3, 6]), 1, True),  # the same length as "a"
        )
    )


def test_decode_rows_are_the_eager_steps_packed_rows() -> None:
    batch = _decode_batch()
    meta = decode_metadata(batch, BS)
    assert meta is not None
    cache = KVCache(2, 16, BS, 2, 8, torch.float32, CPU)
    eager = ModelRunner(object(), cache, Sampler(seed=0)).prepare(batch)  # type: ignore[arg-type]
    assert list(meta.input_ids) == eager.input_ids[0].tolist()
    assert list(meta.positions) == eager.position_ids[0].tolist() == [2, 9, 9]
    assert list(meta.slot_mapping) == eager.attention.slot_mapping.tolist()
    assert [list(t) for t in meta.block_tables] == [[5], [4, 2, 7], [1, 3, 6]]
    assert list(meta.seq_lens) == [3, 10, 10]


@pytest.mark.parametrize(
    "item",
    [
        ScheduledSeq(_seq("prefill", 4, [1, 2]), 3, True),  # a chunk of a prompt
        ScheduledSeq(_seq("draft", 4, [1, 2]), 3, True, (5, 6)),  # speculative: three rows
        ScheduledSeq(_seq("export", 4, [1, 2], export=True), 1, True),  # streams its KV out
    ],
    ids=["prefill", "draft", "export"],
)
def test_a_batch_with_anything_but_plain_decode_runs_eagerly(item: ScheduledSeq) -> None:
    batch = ScheduledBatch((*_decode_batch().items, item))
    assert decode_metadata(batch, BS) is None
    assert decode_metadata(ScheduledBatch(()), BS) is None


class _EagerGraph:
    """A CUDA graph's contract, emulated on CPU: a replay recomputes the step on the same
    input buffers into the same output tensor."""

    def __init__(self, step: Any, inputs: DecodeTensors, output: torch.Tensor) -> None:
        self.step, self.inputs, self.output = step, inputs, output
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.output.copy_(self.step(self.inputs))


def _emulate_graphs(monkeypatch: pytest.MonkeyPatch, fail: set[int] = frozenset()) -> None:
    def capture_bucket(
        self: DecodeGraphs, step: Any, inputs: DecodeTensors, warmup: int
    ) -> Captured:
        if len(inputs.input_ids) in fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        output = step(inputs)
        return Captured(_EagerGraph(step, inputs, output), output)

    monkeypatch.setattr(DecodeGraphs, "available", lambda self: True)
    monkeypatch.setattr(DecodeGraphs, "_capture_bucket", capture_bucket)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    return tiny_model(tmp_path_factory.mktemp("tiny"))


def _runner(tiny_llama: tuple[Any, Any], seed: int = 0) -> ModelRunner:
    """A runner on CPU whose attention is the varlen reference kernel, over a pool of 15
    blocks and a padding block (16), with random stale KV."""
    model, spec = tiny_llama
    cache = KVCache(spec.num_layers, 17, BS, spec.num_kv_heads, spec.head_dim, torch.float32, CPU)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=torch.Generator().manual_seed(seed)))
    return ModelRunner(model, cache, Sampler(seed=0), varlen=reference_varlen_attn)


def _graphs(runner: ModelRunner, buckets: tuple[int, ...] = (1, 2, 4, 8)) -> DecodeGraphs:
    assert runner.fast is not None and runner.varlen is not None
    cache = runner.kv_cache
    buffers = StaticDecodeBuffers(max(buckets), 4, BS, cache.num_blocks - 1, CPU)
    graphs = DecodeGraphs(buffers, buckets)
    graphs.capture(varlen_decode_step(runner.fast, cache, runner.varlen, 4 * BS))
    return graphs


def test_a_replayed_step_computes_the_eager_steps_logits(
    tiny_llama: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _emulate_graphs(monkeypatch)
    eager_runner, graph_runner = _runner(tiny_llama), _runner(tiny_llama)
    padding_before = graph_runner.kv_cache.kv[:, :, -1].clone()
    pool_before = graph_runner.kv_cache.kv[:, :, :-1].clone()
    graph_runner.graphs = _graphs(graph_runner)
    assert torch.equal(graph_runner.kv_cache.kv[:, :, :-1], pool_before)  # capture: padding only
    batch = _decode_batch()  # 3 rows: bucket 4, one padding row
    with torch.inference_mode():
        eager = eager_runner._logits(eager_runner.prepare(batch), batch)
        replayed = graph_runner._logits(graph_runner.prepare(batch), batch)
    assert graph_runner.graphs.captured == (1, 2, 4, 8)
    graph = graph_runner.graphs._graphs[4].graph
    assert isinstance(graph, _EagerGraph) and graph.replays == 1
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
    # the same KV written into the pool; padding rows wrote the padding block alone
    pool = graph_runner.kv_cache.kv[:, :, :-1]
    torch.testing.assert_close(pool, eager_runner.kv_cache.kv[:, :, :-1], rtol=0, atol=1e-6)
    assert not torch.equal(pool, pool_before)
    assert not torch.equal(graph_runner.kv_cache.kv[:, :, -1], padding_before)
    # and through the runner's own step: the same tokens, sampled from the replayed logits
    assert graph_runner.execute(batch) == eager_runner.execute(batch)
    assert graph.replays == 2


def test_a_step_a_graph_cannot_take_runs_eagerly(
    tiny_llama: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _emulate_graphs(monkeypatch)
    runner = _runner(tiny_llama)
    graphs = runner.graphs = _graphs(runner)
    chunk = ScheduledBatch((*_decode_batch().items, ScheduledSeq(_seq("c", 4, [8, 9]), 2, False)))
    eager_runner = _runner(tiny_llama)
    with torch.inference_mode():
        got = runner._logits(runner.prepare(chunk), chunk)
        want = eager_runner._logits(eager_runner.prepare(chunk), chunk)
    assert all(c.graph.replays == 0 for c in graphs._graphs.values())
    assert torch.equal(got, want)


def test_a_failed_capture_is_logged_and_its_bucket_runs_eagerly(
    tiny_llama: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _emulate_graphs(monkeypatch, fail={4})
    runner = _runner(tiny_llama)
    with capture_logs() as logs:
        graphs = runner.graphs = _graphs(runner)
    failed = [e for e in logs if e["event"] == "cuda_graph_capture_failed"]
    assert [(e["bucket"], e["log_level"]) for e in failed] == [(4, "warning")]
    assert "RuntimeError: operation not permitted" in failed[0]["error"]
    assert graphs.captured == (1, 2, 8)
    batch = _decode_batch()  # bucket 4: no graph, so the eager step, and the right logits
    eager_runner = _runner(tiny_llama)
    with torch.inference_mode():
        got = runner._logits(runner.prepare(batch), batch)
        want = eager_runner._logits(eager_runner.prepare(batch), batch)
    assert all(c.graph.replays == 0 for c in graphs._graphs.values())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    two = ScheduledBatch(batch.items[:2])
    with torch.inference_mode():
        runner._logits(runner.prepare(two), two)
    assert graphs._graphs[2].graph.replays == 1


def test_no_graphs_on_cpu_whatever_the_setting(tmp_path: Path) -> None:
    model, spec = tiny_model(tmp_path)
    config = EngineConfig(
        model=ModelConfig(model=str(spec.path)), cache=CacheConfig(block_size=BS, num_blocks=16)
    )
    assert config.cuda_graphs
    engine = Engine(config, model, spec, sink=lambda outputs: None)
    assert engine.runner.graphs is None
    assert decode_graphs(config, engine.runner, model) is None
