"""engine.cuda_graphs on CPU: buckets, padding into static buffers, the setting, and that
nothing graph-related is made off CUDA."""

from __future__ import annotations

import argparse

import pytest
import torch

from core.settings import add_settings
from engine.config import EngineConfig
from engine.cuda_graphs import (
    DEFAULT_BUCKETS,
    DecodeGraphs,
    DecodeMetadata,
    DecodeTensors,
    StaticDecodeBuffers,
    choose_bucket,
    graph_buckets,
)
from engine.settings import ENGINE, MODEL, engine_config

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
