"""The KV connector contract, on the scheduler (no model) and on an engine over a tiny model with
fake connectors: export layerwise or after the prefill, import via a reservation and an
:class:`ImportQueue` drained before each step (READY admits, FAILED frees, late results drop)."""

from __future__ import annotations

import pytest
import torch

from core.errors import OutOfBlocksError
from core.sampling import FinishReason, SamplingParams
from engine.block_pool import BlockPool
from engine.config import SchedulerConfig
from engine.engine import Engine, RequestOutput
from engine.kv_connector import ExportMode, ImportQueue, ImportStatus, LayerPages, Reservation
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from tests.engine.tiny_engine import engine_config, greedy_reference, tiny_model

PROMPT = list(range(10, 31))  # 21 tokens: 6 blocks of 4, the last one partial
MAX_TOKENS = 8


class FakeExport:
    """An export connector that records what the engine saves."""

    def __init__(self, mode: ExportMode, fail: bool = False) -> None:
        self._mode = mode
        self.fail = fail
        self.saved: list[LayerPages] = []

    @property
    def mode(self) -> ExportMode:
        return self._mode

    def save_layer(self, layer: LayerPages) -> None:
        self.saved.append(layer)
        if self.fail:
            raise RuntimeError("transport down")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, spec = tiny_model(tmp_path_factory.mktemp("llama"))
    return model, spec, greedy_reference(model, PROMPT, MAX_TOKENS)


def _engine(tiny, **kwargs) -> Engine:
    model, spec, _ = tiny
    return Engine(engine_config(spec, **kwargs), model, spec, sink=lambda outputs: None)


def _seq(tiny, rid: str, prompt: list[int] = PROMPT, n: int = MAX_TOKENS) -> Sequence:
    spec = tiny[1]
    return Sequence(
        rid,
        list(prompt),
        len(prompt),
        SamplingParams(max_tokens=n, temperature=0),
        spec.eos_token_ids,
    )


def _drain(engine: Engine, limit: int = 500) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    for _ in range(limit):
        step = engine.step()
        outputs.extend(step)
        if not step and not engine.scheduler.has_work():
            return outputs
    raise AssertionError("engine did not finish")


def _export(tiny, mode: ExportMode | None) -> tuple[Engine, FakeExport | None, RequestOutput]:
    engine = _engine(tiny, budget=8)  # chunked: the export happens in the last chunk's step
    fake = FakeExport(mode) if mode is not None else None
    engine.set_export_connector(fake)
    engine.add(_seq(tiny, "p"), export_kv=True)
    outputs = _drain(engine)
    assert len(outputs) == 1 and engine.pool.num_free == engine.pool.num_blocks
    return engine, fake, outputs[0]


# -- the scheduler's side ---------------------------------------------------------------------


def test_scheduler_retire_ends_a_running_sequence_and_frees_its_blocks() -> None:
    pool = BlockPool(8)
    sched = Scheduler(SchedulerConfig(enable_prefix_caching=False), pool, 4)
    seq = Sequence("a", [5] * 6, 6, SamplingParams(max_tokens=4))
    sched.add(seq)
    batch = sched.schedule()
    assert batch is not None
    sched.update(batch, [7])
    assert sched.running == [seq] and pool.num_free < 8
    sched.retire(seq, FinishReason.STOP)
    assert sched.running == [] and pool.num_free == 8
    assert seq.status is SequenceStatus.FINISHED and seq.block_table == []
    sched.retire(seq, FinishReason.STOP)  # already out of ``running``: still fine


def test_scheduler_check_fits_and_is_awaiting_kv() -> None:
    pool = BlockPool(4)
    sched = Scheduler(SchedulerConfig(), pool, 4)
    too_long = Sequence("x", [5] * 12, 12, SamplingParams(max_tokens=8))
    with pytest.raises(OutOfBlocksError, match="needs 5 KV blocks of 4 tokens"):
        sched.check_fits(too_long, export_kv=False)
    sched.check_fits(too_long, export_kv=True)  # an export needs only its prompt's blocks
    seq = Sequence("r", [5] * 5, 5, SamplingParams(max_tokens=2))
    sched.reserve(seq)
    assert sched.is_awaiting_kv("r") and not sched.is_awaiting_kv("x")


def test_import_queue_wakes_its_binder_and_drains_in_order() -> None:
    queue = ImportQueue()
    wakes: list[None] = []
    queue.ready("a", 3)  # before bind: no wake, still queued
    queue.bind(lambda: wakes.append(None))
    queue.failed("b", "lease expired")
    assert queue.has_finished() and len(wakes) == 1
    results = queue.take_finished()
    assert [(r.request_id, r.status) for r in results] == [
        ("a", ImportStatus.READY),
        ("b", ImportStatus.FAILED),
    ]
    assert results[0].first_token_id == 3 and results[1].error == "lease expired"
    assert not queue.has_finished() and queue.take_finished() == []


def test_reservation_writable_skips_the_cached_prefix() -> None:
    assert Reservation("r", (4, 5, 6), 2).writable == (6,)


# -- export -----------------------------------------------------------------------------------


def test_layerwise_export_saves_every_layer_once_and_matches_after_prefill(tiny) -> None:
    _, streamed, out = _export(tiny, ExportMode.LAYERWISE)
    _, _, whole = _export(tiny, None)  # no connector: AFTER_PREFILL
    assert streamed is not None and out.pages is None
    assert [s.layer for s in streamed.saved] == list(range(tiny[1].num_layers))
    assert {s.request_id for s in streamed.saved} == {"p"}
    assert whole.pages is not None and out.token_ids == whole.token_ids
    assert torch.equal(torch.cat([s.pages for s in streamed.saved]), whole.pages)
    assert out.token_ids == (tiny[2][0],) and out.timings is not None


def test_after_prefill_connector_is_not_called_mid_forward(tiny) -> None:
    _, fake, out = _export(tiny, ExportMode.AFTER_PREFILL)
    assert fake is not None and fake.saved == []
    assert out.pages is not None and out.pages.shape[2] == 6  # the prompt's blocks


def test_a_failing_export_connector_does_not_fail_the_step(tiny) -> None:
    engine = _engine(tiny)
    engine.set_export_connector(FakeExport(ExportMode.LAYERWISE, fail=True))
    engine.add(_seq(tiny, "p"), export_kv=True)
    (out,) = _drain(engine)
    assert out.finish_reason is None and out.token_ids == (tiny[2][0],)


# -- import -----------------------------------------------------------------------------------


def test_import_through_the_queue_continues_token_identically(tiny) -> None:
    _, _, exported = _export(tiny, None)
    assert exported.pages is not None
    decode = _engine(tiny)
    queue = ImportQueue()
    decode.set_import_connector(queue)
    reservation = decode.reserve_import(_seq(tiny, "d"))
    assert reservation.request_id == "d" and reservation.cached_blocks == 0
    assert len(reservation.block_ids) == 6 and decode.stats().awaiting_kv == 1
    decode.kv_cache.scatter_pages(list(reservation.writable), exported.pages)
    assert decode.step() == []  # nothing reported yet: the sequence keeps waiting
    queue.ready("d", exported.token_ids[0])
    outputs = _drain(decode)
    tokens = [t for o in outputs for t in o.token_ids]
    assert [exported.token_ids[0], *tokens] == tiny[2]
    assert outputs[-1].finish_reason is FinishReason.LENGTH
    assert decode.pool.num_free == decode.pool.num_blocks


def test_failed_import_frees_the_reservation_with_an_error_output(tiny) -> None:
    engine = _engine(tiny)
    queue = ImportQueue()
    engine.set_import_connector(queue)
    engine.reserve_import(_seq(tiny, "d"))
    queue.failed("d", "KV transfer failed: bad tag")
    (out,) = engine.step()
    assert out.finish_reason is FinishReason.ERROR and out.error == "KV transfer failed: bad tag"
    assert engine.pool.num_free == engine.pool.num_blocks and engine.stats().awaiting_kv == 0


def test_results_for_aborted_or_unknown_imports_are_dropped(tiny) -> None:
    engine = _engine(tiny)
    queue = ImportQueue()
    engine.set_import_connector(queue)
    engine.reserve_import(_seq(tiny, "d"))
    engine.abort("d")  # the owner went away first
    queue.ready("d", 5)
    queue.failed("nobody", "late")
    assert engine.step() == [] and not engine.scheduler.has_work()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_first_token_that_ends_an_import_finishes_at_once(tiny) -> None:
    engine = _engine(tiny)
    queue = ImportQueue()
    engine.set_import_connector(queue)
    engine.reserve_import(_seq(tiny, "d", n=1))
    queue.ready("d", 42)
    (out,) = engine.step()
    assert out.finish_reason is FinishReason.LENGTH and out.token_ids == ()
    assert out.num_completion_tokens == 1 and engine.pool.num_free == engine.pool.num_blocks


def test_prefix_cache_hit_is_not_writable(tiny) -> None:
    engine = _engine(tiny)
    engine.add(_seq(tiny, "warm"))
    _drain(engine)  # the prompt's full blocks are now cached
    reservation = engine.reserve_import(_seq(tiny, "d"))
    assert reservation.cached_blocks == 5  # 20 of 21 tokens: every full block
    assert reservation.writable == reservation.block_ids[5:]
