"""The supervisor on real (tiny, model-free) child processes: a worker that dies is restarted
with backoff on the same command line, a crash loop is given up on with a log line while the
rest serve, a taken port is reported at once (and the child never started), and the gateway's
death, any death under ``fail_fast`` and the loss of every decode worker stop the cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from pdserve.supervisor import (
    Bind,
    ChildState,
    ClusterFailed,
    ProcessSpec,
    RestartPolicy,
    Supervisor,
    exit_reason,
)
from pdserve.supervisor_metrics import SupervisorMetrics

SLEEPER = (sys.executable, "-c", "import time; time.sleep(120)")
CRASHER = (sys.executable, "-c", "import sys; sys.exit(3)")
FAST = RestartPolicy(delay_s=0.05, max_delay_s=0.2, limit=3, window_s=60.0)


def _spec(name: str, argv: tuple[str, ...] = SLEEPER, binds: tuple[Bind, ...] = ()) -> ProcessSpec:
    return ProcessSpec(name, f"127.0.0.1:{hash(name) % 1000 + 1}", argv, binds=binds)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def make(registry: CollectorRegistry, tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    made: list[Supervisor] = []

    def build(specs: list[ProcessSpec], **kwargs: object) -> Supervisor:
        options: dict[str, object] = {
            "probe": lambda spec: True,
            "policy": FAST,
            "stop_grace_s": 2.0,
            "metrics": SupervisorMetrics(registry),
            "state_file": tmp_path / "state.json",
            **kwargs,
        }
        supervisor = Supervisor(specs, dict(os.environ), **options)  # type: ignore[arg-type]
        made.append(supervisor)
        return supervisor

    yield build
    for supervisor in made:
        supervisor.stop()


def _tick_until(supervisor: Supervisor, done: Callable[[], bool], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, {n: c.state for n, c in supervisor.children.items()}
        supervisor.tick()
        time.sleep(0.02)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_the_delay_doubles_up_to_the_cap_and_the_limit_gives_up() -> None:
    policy = RestartPolicy(delay_s=0.5, max_delay_s=30, limit=8, window_s=60)
    assert [policy.delay(n) for n in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, None]
    assert RestartPolicy(limit=0).delay(0) is None


def test_exit_reasons_name_the_signal_or_the_code() -> None:
    assert exit_reason(-signal.SIGKILL) == "SIGKILL"
    assert exit_reason(3) == "exit_3"
    assert exit_reason(0) == "exit_0"


def test_a_killed_worker_is_restarted_on_the_same_command_line(
    make: Callable[..., Supervisor], registry: CollectorRegistry, tmp_path: Path
) -> None:
    sup = make([_spec("gateway"), _spec("decode-0"), _spec("decode-1")])
    sup.start()
    _tick_until(sup, lambda: sup.ready)
    child = sup.children["decode-0"]
    first = child.pid
    with capture_logs() as logs:
        os.kill(first, signal.SIGKILL)
        _tick_until(sup, lambda: child.state is ChildState.SERVING and child.pid != first)
    events = [e["event"] for e in logs if e.get("worker") == "decode-0"]
    assert events == [
        "worker_exited",
        "worker_restart_scheduled",
        "worker_restarted",
        "child_serving",
    ]
    exited = next(e for e in logs if e["event"] == "worker_exited")
    assert exited["reason"] == "SIGKILL" and exited["exit_code"] == -9 and exited["pid"] == first
    scheduled = next(e for e in logs if e["event"] == "worker_restart_scheduled")
    assert scheduled["attempt"] == 1 and scheduled["delay_s"] == FAST.delay_s
    assert sup.children["decode-1"].starts == 1  # the others were left alone
    assert _value(registry, "pdserve_worker_exits_total", worker="decode-0", reason="SIGKILL") == 1
    assert _value(registry, "pdserve_worker_restarts_total", worker="decode-0") == 1
    assert _value(registry, "pdserve_worker_up", worker="decode-0") == 1
    state = {c["name"]: c for c in json.loads((tmp_path / "state.json").read_text())["children"]}
    assert state["decode-0"]["pid"] == child.pid and state["decode-0"]["restarts"] == 1
    assert state["decode-0"]["argv"] == list(SLEEPER)


def test_a_crash_loop_is_given_up_on_while_the_rest_serve(
    make: Callable[..., Supervisor], registry: CollectorRegistry, tmp_path: Path
) -> None:
    sup = make(
        [_spec("gateway"), _spec("decode-0"), _spec("decode-1", CRASHER)],
        probe=lambda spec: spec.name != "decode-1",  # a crasher never serves
    )
    with capture_logs() as logs:
        sup.start()
        _tick_until(sup, lambda: sup.ready)
    assert sup.gave_up() == ["decode-1"]
    mine = [e for e in logs if e.get("worker") == "decode-1"]
    delays = [e["delay_s"] for e in mine if e["event"] == "worker_restart_scheduled"]
    assert delays == [0.05, 0.1, 0.2]  # doubling, capped at max_delay_s
    [gave_up] = [e for e in mine if e["event"] == "worker_gave_up"]
    assert gave_up["reason"] == "exit_3" and gave_up["restarts"] == FAST.limit
    assert gave_up["log_level"] == "error"
    assert sup.children["decode-1"].starts == FAST.limit + 1
    assert _value(registry, "pdserve_worker_exits_total", worker="decode-1", reason="exit_3") == 4
    assert _value(registry, "pdserve_worker_gave_up", worker="decode-1") == 1
    sup.tick()  # given up means left alone
    assert sup.children["decode-1"].starts == FAST.limit + 1
    assert sup.children["decode-0"].state is ChildState.SERVING
    state = {c["name"]: c for c in json.loads((tmp_path / "state.json").read_text())["children"]}
    assert state["decode-1"]["state"] == "gave_up"


def test_failures_older_than_the_window_are_forgotten(make: Callable[..., Supervisor]) -> None:
    slow_crasher = (sys.executable, "-c", "import sys, time; time.sleep(0.4); sys.exit(3)")
    sup = make(
        [_spec("gateway"), _spec("decode-0"), _spec("decode-1", slow_crasher)],
        policy=RestartPolicy(delay_s=0.05, max_delay_s=1, limit=1, window_s=0.3),
        probe=lambda spec: spec.name != "decode-1",
    )
    sup.start()
    crasher = sup.children["decode-1"]
    # it fails every 0.45 s or so: each failure is alone in its 0.3 s window
    _tick_until(sup, lambda: crasher.starts >= 4 or crasher.state is ChildState.GAVE_UP)
    assert crasher.state is not ChildState.GAVE_UP
    assert crasher.failures and len(crasher.failures) <= 1


def test_a_taken_port_is_reported_at_once_and_the_worker_never_starts(
    make: Callable[..., Supervisor], registry: CollectorRegistry
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        sup = make(
            [
                _spec("gateway"),
                _spec("decode-0"),
                _spec("decode-1", binds=(Bind("127.0.0.1", port),)),
            ]
        )
        with capture_logs() as logs:
            sup.start()
            first = [e for e in logs if e.get("worker") == "decode-1"]
            _tick_until(sup, lambda: sup.ready)
    assert first[0]["event"] == "worker_port_unavailable"  # before any tick: at once
    assert first[0]["port"] == port and "in use" in str(first[0]["error"])
    assert sup.children["decode-1"].starts == 0 and sup.gave_up() == ["decode-1"]
    assert (
        _value(registry, "pdserve_worker_port_unavailable_total", worker="decode-1", port=str(port))
        == FAST.limit + 1
    )


def test_a_port_freed_during_the_backoff_lets_the_worker_start(
    make: Callable[..., Supervisor],
) -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]
    sup = make(
        [_spec("gateway"), _spec("decode-0", binds=(Bind("127.0.0.1", port),))],
        policy=RestartPolicy(delay_s=0.3, limit=5),
    )
    sup.start()
    assert sup.children["decode-0"].state is ChildState.BACKOFF
    held.close()
    _tick_until(sup, lambda: sup.ready)
    assert sup.children["decode-0"].starts == 1


def test_the_gateway_dying_stops_the_cluster(make: Callable[..., Supervisor]) -> None:
    sup = make([_spec("gateway"), _spec("decode-0")])
    sup.start()
    _tick_until(sup, lambda: sup.ready)
    os.kill(sup.children["gateway"].pid, signal.SIGKILL)
    with pytest.raises(ClusterFailed, match="gateway"):
        _tick_until(sup, lambda: False)


def test_fail_fast_stops_on_any_worker(make: Callable[..., Supervisor]) -> None:
    sup = make([_spec("gateway"), _spec("decode-0"), _spec("decode-1")], fail_fast=True)
    sup.start()
    _tick_until(sup, lambda: sup.ready)
    os.kill(sup.children["decode-1"].pid, signal.SIGKILL)
    with pytest.raises(ClusterFailed, match=r"decode-1.*fail-fast"):
        _tick_until(sup, lambda: False)


def test_keep_going_is_a_limit_of_zero(make: Callable[..., Supervisor]) -> None:
    sup = make(
        [_spec("gateway"), _spec("decode-0"), _spec("decode-1")], policy=RestartPolicy(limit=0)
    )
    sup.start()
    _tick_until(sup, lambda: sup.ready)
    os.kill(sup.children["decode-1"].pid, signal.SIGKILL)
    _tick_until(sup, lambda: sup.gave_up() == ["decode-1"])
    assert sup.children["decode-1"].starts == 1


def test_losing_every_decode_worker_stops_the_cluster(make: Callable[..., Supervisor]) -> None:
    sup = make([_spec("gateway"), _spec("prefill-0"), _spec("decode-0", CRASHER)])
    sup.start()
    with pytest.raises(ClusterFailed, match="every decode worker"):
        _tick_until(sup, lambda: False)


def test_decode_workers_elsewhere_keep_the_cluster_up(make: Callable[..., Supervisor]) -> None:
    sup = make(
        [_spec("gateway"), _spec("decode-0", CRASHER)],
        decode_elsewhere=True,
        probe=lambda spec: spec.name == "gateway",
    )
    sup.start()
    _tick_until(sup, lambda: sup.ready)
    assert sup.gave_up() == ["decode-0"]


def test_a_worker_that_never_serves_is_killed_after_the_start_timeout(
    make: Callable[..., Supervisor], registry: CollectorRegistry
) -> None:
    sup = make(
        [_spec("gateway"), _spec("decode-0"), _spec("decode-1")],
        probe=lambda spec: spec.name != "decode-1",
        start_timeout_s=0.3,
        policy=RestartPolicy(delay_s=0.05, limit=1),
    )
    sup.start()
    first = sup.children["decode-1"].proc
    _tick_until(sup, lambda: sup.ready)
    assert first is not None and first.returncode == -signal.SIGKILL
    assert sup.gave_up() == ["decode-1"]
    assert (
        _value(registry, "pdserve_worker_exits_total", worker="decode-1", reason="start_timeout")
        == 2  # the first start and its one restart
    )
    assert sup.children["decode-1"].last_reason == "start_timeout"


def test_stop_ends_every_child(make: Callable[..., Supervisor]) -> None:
    sup = make([_spec("gateway"), _spec("decode-0")])
    sup.start()
    procs = [c.proc for c in sup.children.values()]
    sup.stop()
    assert all(p is not None and p.poll() is not None for p in procs)
