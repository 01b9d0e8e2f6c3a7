"""The engine thread's names and its step monitor: the thread is named for Python and the OS;
the monitor reports the step under way, its last move and what it holds, and an exception that
kills the thread; a real engine marks a move per layer on both forward paths (LlamaForward and
transformers' hooks); a stuck engine's requests can be failed without asking it anything."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from core.errors import EngineStoppedError
from core.sampling import SamplingParams
from engine.async_engine import AsyncEngine
from engine.engine import Engine
from engine.engine_thread import (
    ENGINE_THREAD_NAME,
    StepMonitor,
    set_native_thread_name,
)
from engine.scheduler import ScheduledBatch, ScheduledSeq
from engine.sequence import Sequence
from tests.engine.tiny_engine import engine_config, tiny_model


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _seq(key: str) -> Sequence:
    return Sequence(key, [1, 2, 3], 3, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))


def _comm(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().strip()


def test_the_engine_thread_is_named_for_python_and_the_os() -> None:
    seen: dict[str, object] = {}
    running, release = threading.Event(), threading.Event()

    def loop() -> None:
        seen["name"] = threading.current_thread().name
        seen["comm"] = _comm(threading.get_native_id())
        running.set()
        release.wait(5)

    monitor = StepMonitor()
    assert not monitor.snapshot().thread_alive  # not started yet
    thread = monitor.start_thread(loop)
    try:
        assert running.wait(5)
        assert monitor.snapshot().thread_alive and monitor.thread is thread
    finally:
        release.set()
        thread.join(5)
    assert seen["name"] == ENGINE_THREAD_NAME == thread.name
    assert seen["comm"] == ENGINE_THREAD_NAME  # what top -H and /proc/<pid>/task/*/comm show
    assert len(ENGINE_THREAD_NAME.encode()) <= 15
    assert not monitor.snapshot().thread_alive and monitor.snapshot().died is None


def test_a_native_name_longer_than_the_os_allows_is_cut_to_15_bytes() -> None:
    result: list[str] = []

    def run() -> None:
        assert set_native_thread_name("pdserve-a-very-long-thread-name")
        result.append(_comm(threading.get_native_id()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(5)
    assert result == ["pdserve-a-very-"]


def test_the_snapshot_shows_the_step_under_way_its_last_move_and_its_batch() -> None:
    clock = FakeClock()
    batch = ScheduledBatch((ScheduledSeq(_seq("a"), 5, True), ScheduledSeq(_seq("b"), 1, True)))
    held: list[ScheduledBatch | None] = [None]
    work = [False]
    monitor = StepMonitor(lambda: held[0], lambda: work[0], clock)
    idle = monitor.snapshot()
    assert (idle.steps, idle.started_at, idle.moved_at, idle.seqs) == (0, None, None, 0)
    inner: list[int] = []
    with monitor.step():
        held[0] = batch
        clock.t = 101.0
        on_layer = monitor.listening(inner.append)
        on_layer(0)
        clock.t = 102.5
        on_layer(1)
        snap = monitor.snapshot()
        assert (snap.steps, snap.started_at, snap.moved_at, snap.layer) == (1, 100.0, 102.5, 1)
        assert (snap.seqs, snap.tokens, snap.request_ids) == (2, 6, ("a", "b"))
        assert snap.moves == 3  # the step's start and two layers
        assert inner == [0, 1]  # the step's own listener still hears every layer
    after = monitor.snapshot()
    assert (after.steps, after.started_at, after.moved_at, after.layer) == (1, None, None, None)
    work[0] = True  # between steps with work waiting: busy since the last move
    waiting = monitor.snapshot()
    assert (waiting.started_at, waiting.moved_at, waiting.seqs) == (None, 102.5, 0)
    with monitor.step():
        assert monitor.snapshot().layer is None  # a new step has finished no layer yet
        monitor.listening(None)(0)  # no listener of its own: only the mark
        assert monitor.snapshot().moves == 5


def test_an_exception_that_ends_the_engine_thread_is_recorded() -> None:
    def loop() -> None:
        raise RuntimeError("scheduler invariant broken")

    monitor = StepMonitor()
    monitor.start_thread(loop).join(5)
    snap = monitor.snapshot()
    assert not snap.thread_alive
    assert snap.died == "RuntimeError: scheduler invariant broken"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_real_engine_marks_every_layer_of_every_step(arch: str, tmp_path: Path) -> None:
    model, spec = tiny_model(tmp_path / arch, arch)
    engine = Engine(engine_config(spec), model, spec, sink=lambda outputs: None)
    layers: list[int] = []
    original = engine.monitor.listening

    def spy(inner: Callable[[int], None] | None) -> Callable[[int], None]:
        listener = original(inner)

        def on_layer(layer: int) -> None:
            layers.append(layer)
            listener(layer)

        return on_layer

    engine.monitor.listening = spy  # type: ignore[method-assign]
    engine.add(_seq("r0"))
    steps = 0
    while engine.scheduler.has_work():
        with engine.monitor.step():
            engine.step()
        steps += 1
    assert steps == 4  # the prompt, then three more tokens
    assert layers == list(range(spec.num_layers)) * steps
    assert engine.monitor.snapshot().moves == steps * (1 + spec.num_layers)


def test_fail_requests_ends_every_open_request_without_the_engine(tmp_path: Path) -> None:
    model, spec = tiny_model(tmp_path / "llama")
    engine = AsyncEngine(engine_config(spec), model, spec)

    async def run() -> tuple[int, list[str]]:
        handles = [engine.reserve(engine.new_sequence(f"r{i}", [1, 2, 3], SamplingParams()))[0]
                   for i in range(3)]  # fmt: skip
        failed = engine.fail_requests(EngineStoppedError("engine stalled"))
        errors = []
        for handle in handles:
            with pytest.raises(EngineStoppedError) as caught:
                await handle.next_output()
            errors.append(str(caught.value))
            assert handle.finished
            handle.close()  # a no-op now: the (stuck) engine is not asked to abort
        assert engine.fail_requests(EngineStoppedError("again")) == 0  # none left open
        return failed, errors

    failed, errors = asyncio.run(run())
    assert failed == 3 and errors == ["engine stalled"] * 3
    assert engine.stats().awaiting_kv == 3  # the blocks stay taken: the process is going


def test_the_async_engine_s_spec_names_the_weights_it_computes_from(tmp_path: Path) -> None:
    """Workers build their KV fingerprint from ``AsyncEngine.spec``: it must carry the plan's
    label, not the loaded spec's default."""
    from dataclasses import replace

    from engine.config import WeightsChoice
    from engine.kernels import KernelBuildError
    from engine.kernels.quant_linear import load_quant_linear
    from engine.model_files import default_cache_dir

    try:
        load_quant_linear(default_cache_dir())
    except KernelBuildError as exc:
        pytest.skip(str(exc))
    model, spec = tiny_model(tmp_path / "llama")
    assert spec.weights == "float"
    engine = AsyncEngine(replace(engine_config(spec), weights=WeightsChoice.INT8), model, spec)
    assert engine.spec.weights == "int8:q8_0" == engine.engine.spec.weights
