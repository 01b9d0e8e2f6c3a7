"""``pdserve up``'s plan: ports, metrics ports, threads, pinning and TLS per role, and children's
command lines that parse back, with the child's own parser, to the values ``up`` was given."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

import pytest

from pdserve import launcher
from pdserve.cli import build_parser
from pdserve.launcher import GATEWAY_FLAGS, WORKER_FLAGS, ProcessSpec, cluster_env, plan_cluster

BASE = ["--worker-base-port", "40000", "--port", "40100"]
OWN_WORKER = {"log_level", "threads", "cpus"}  # what the launcher sets per worker


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("PDSERVE_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6}, raising=False)
    yield


def _up(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["up", *BASE, *flags])


def _plan(args: argparse.Namespace) -> dict[str, ProcessSpec]:
    return {spec.name: spec for spec in plan_cluster(args, args.log_level)}


def _child(
    spec: ProcessSpec, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> argparse.Namespace:
    """The child's values as it parses its command line in the environment ``up`` gives it."""
    assert spec.argv[1:3] == ("-m", "pdserve.cli")
    with monkeypatch.context() as m:
        for name in list(os.environ):
            m.delenv(name)
        for name, value in env.items():
            m.setenv(name, value)
        return build_parser().parse_args(list(spec.argv[3:]))


def _children(
    args: argparse.Namespace, monkeypatch: pytest.MonkeyPatch
) -> dict[str, argparse.Namespace]:
    env = cluster_env(args)
    return {name: _child(spec, env, monkeypatch) for name, spec in _plan(args).items()}


def _assert_passed_on(parent: argparse.Namespace, children: dict[str, argparse.Namespace]) -> None:
    for name, child in children.items():
        flags = GATEWAY_FLAGS if name == "gateway" else WORKER_FLAGS
        for setting in flags:
            if setting.dest in OWN_WORKER and name != "gateway":
                continue
            assert getattr(child, setting.dest) == getattr(parent, setting.dest), (name, setting)
        assert child.command == name.split("-")[0]


DISAGGREGATED = (
    "--prefill=2",
    "--decode=2",
    "--num-blocks=99",
    "--block-size=8",
    "--no-prefix-caching",
    "--kv-cache-memory=1GiB",
    "--max-model-len=512",
    "--cache-dir=/tmp/pdserve-cache",
    "--dtype=bfloat16",
    "--attention-kernel=torch",
    "--kv-backend=stream",
    "--kv-streaming=after-prefill",
    "--kv-insecure",
    "--no-kv-checksum",
    "--kv-ack-timeout=4.5",
    "--router=round-robin",
    "--max-attempts=2",
    "--stale-after=0.5",
    "--max-prompt-tokens=77",
    "--http-port=8123",
    "--served-model-name=tiny",
    "--auth-token-file=/tmp/pdserve-tokens",
    "--shutdown-grace=7",
    "--max-queue=3",
    "--metrics-base-port=9200",
    "--also-prefill=10.0.0.1:1",
    "--also-decode=10.0.0.2:2",
    "--threads=2",
    "--cpus=1,2",
    "--log-format=json",
)


def test_disaggregated_ports_and_passed_on_values(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _up(*DISAGGREGATED)
    children = _children(args, monkeypatch)
    assert list(children) == ["prefill-0", "prefill-1", "decode-0", "decode-1", "gateway"]
    listen = {name: child.listen for name, child in children.items()}
    assert listen == {
        "prefill-0": "127.0.0.1:40000",
        "prefill-1": "127.0.0.1:40001",
        "decode-0": "127.0.0.1:40002",
        "decode-1": "127.0.0.1:40003",
        "gateway": "127.0.0.1:40100",
    }
    assert [children[f"decode-{i}"].kv_bind for i in range(2)] == [
        "tcp://127.0.0.1:0",  # the kernel's pick, announced in each ticket
        "tcp://127.0.0.1:0",
    ]
    metrics = [child.metrics_port for child in children.values()]
    assert metrics == [9201, 9202, 9203, 9204, 9200]
    gateway = children["gateway"]
    assert (gateway.http_port, gateway.served_model_name) == (8123, ["tiny"])
    assert gateway.prefill == ["127.0.0.1:40000", "127.0.0.1:40001", "10.0.0.1:1"]
    assert gateway.decode == ["127.0.0.1:40002", "127.0.0.1:40003", "10.0.0.2:2"]
    for name, child in children.items():
        if name != "gateway":
            assert (child.threads, child.cpus, child.log_level) == (2, "1,2", "info")
    _assert_passed_on(args, children)


def test_each_flag_is_given_once(monkeypatch: pytest.MonkeyPatch) -> None:
    for spec in _plan(_up(*DISAGGREGATED)).values():
        flags = [a for a in spec.argv if a.startswith("--")]
        repeated = {"--prefill", "--decode"} if spec.name == "gateway" else set()
        assert len(set(flags) - repeated) == len([f for f in flags if f not in repeated])


def test_colocated_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _up("--prefill=0", "--decode=1")
    children = _children(args, monkeypatch)
    assert list(children) == ["decode-0", "gateway"]
    decode, gateway = children["decode-0"], children["gateway"]
    assert (decode.listen, decode.kv_bind) == ("127.0.0.1:40000", "tcp://127.0.0.1:0")
    assert gateway.prefill == [] and gateway.decode == ["127.0.0.1:40000"]
    assert decode.metrics_port == 0 and gateway.metrics_port == 0
    assert gateway.http_port == 8000 and gateway.served_model_name == []
    assert decode.threads == max(1, (os.cpu_count() or 1) // 1)
    assert decode.cpus is None and decode.no_prefix_caching is False
    assert all(c.tls_cert is None and not c.tls_require_client_cert for c in children.values())
    _assert_passed_on(args, children)


def test_ipc_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _up("--prefill=1", "--decode=2", "--kv-transport=ipc")
    children = _children(args, monkeypatch)
    for i in range(2):
        kv = children[f"decode-{i}"].kv_bind
        assert kv.startswith("ipc://") and kv.endswith(f"-{os.getpid()}-decode-{i}.sock")
    threads = max(1, (os.cpu_count() or 1) // 3)
    assert {c.threads for n, c in children.items() if n != "gateway"} == {threads}


@pytest.mark.parametrize("require", [False, True])
def test_tls_per_role(monkeypatch: pytest.MonkeyPatch, require: bool) -> None:
    tls = ["--tls-cert=/c.pem", "--tls-key=/k.pem", "--tls-ca=/ca.pem"]
    args = _up("--prefill=1", *tls, *(["--tls-require-client-cert"] if require else []))
    children = _children(args, monkeypatch)
    for name in ("prefill-0", "decode-0"):
        worker = children[name]
        assert (str(worker.tls_cert), str(worker.tls_key), str(worker.tls_ca)) == (
            "/c.pem",
            "/k.pem",
            "/ca.pem",
        )
        assert worker.tls_require_client_cert is True  # the gateway's certificate (mTLS)
    gateway = children["gateway"]
    assert str(gateway.tls_cert) == "/c.pem" and gateway.tls_require_client_cert is require
    upstream = (gateway.upstream_tls_ca, gateway.upstream_tls_cert, gateway.upstream_tls_key)
    assert tuple(map(str, upstream)) == ("/ca.pem", "/c.pem", "/k.pem")
    assert launcher._cluster_tls(args) is not None


def test_tls_from_the_environment_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_TLS_CERT", "/c.pem")
    monkeypatch.setenv("PDSERVE_TLS_KEY", "/k.pem")
    monkeypatch.setenv("PDSERVE_TLS_CA", "/ca.pem")
    monkeypatch.setenv("PDSERVE_TLS_REQUIRE_CLIENT_CERT", "false")
    children = _children(_up(), monkeypatch)
    assert children["decode-0"].tls_require_client_cert is True
    assert children["gateway"].tls_require_client_cert is False
    assert str(children["gateway"].upstream_tls_ca) == "/ca.pem"


def test_pinned_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    args = _up("--prefill=2", "--decode=2", "--pin-cpus", "--cpus=9")
    specs = _plan(args)
    children = _children(args, monkeypatch)
    cores = [children[n].cpus for n in ("prefill-0", "prefill-1", "decode-0", "decode-1")]
    assert cores == ["4", "5", "6", "4"]
    assert specs["gateway"].cpus == (4,)
    assert all(not specs[n].cpus for n in specs if n != "gateway")


def test_up_variables_reach_children_as_flags_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``PDSERVE_PREFILL=0`` is ``up``'s worker count, not the gateway's prefill address."""
    monkeypatch.setenv("PDSERVE_PREFILL", "0")
    monkeypatch.setenv("PDSERVE_NUM_BLOCKS", "33")
    monkeypatch.setenv("PDSERVE_KV_KEY", "k" * 32)
    monkeypatch.setenv("PDSERVE_KV_ADVERTISE", "tcp://10.0.0.3:5")
    args = build_parser().parse_args(["up", *BASE])
    env = cluster_env(args)
    assert "PDSERVE_PREFILL" not in env and "PDSERVE_NUM_BLOCKS" not in env
    assert env["PDSERVE_KV_KEY"] == "k" * 32  # secrets and the tiers' own variables stay
    children = _children(args, monkeypatch)
    assert list(children) == ["decode-0", "gateway"] and children["gateway"].prefill == []
    assert children["decode-0"].num_blocks == 33
    assert children["decode-0"].kv_advertise == "tcp://10.0.0.3:5"


def test_a_fresh_key_unless_one_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(cluster_env(_up())["PDSERVE_KV_KEY"]) == 64
    assert "PDSERVE_KV_KEY" not in cluster_env(_up("--kv-insecure"))


def test_every_port_a_child_binds_is_checked_before_it_starts() -> None:
    specs = _plan(_up(*DISAGGREGATED))
    binds = {name: [tuple(b) for b in spec.binds] for name, spec in specs.items()}
    assert binds == {
        "prefill-0": [("127.0.0.1", 40000), ("0.0.0.0", 9201)],
        "prefill-1": [("127.0.0.1", 40001), ("0.0.0.0", 9202)],
        "decode-0": [("127.0.0.1", 40002), ("0.0.0.0", 9203)],
        "decode-1": [("127.0.0.1", 40003), ("0.0.0.0", 9204)],
        "gateway": [("127.0.0.1", 40100), ("0.0.0.0", 9200), ("127.0.0.1", 8123)],
    }
    assert launcher.launcher_metrics_port(_up(*DISAGGREGATED)) == 9205  # after the workers'
    ipc = _plan(_up("--decode=1", "--kv-transport=ipc", "--http-port=0"))
    assert [tuple(b) for b in ipc["decode-0"].binds] == [("127.0.0.1", 40001)]
    assert [tuple(b) for b in ipc["gateway"].binds] == [("127.0.0.1", 40100)]
    assert launcher.launcher_metrics_port(_up()) == 0


def test_the_default_worker_ports_are_below_the_ephemeral_range() -> None:
    args = build_parser().parse_args(["up", "--prefill=8", "--decode=8"])
    ports = range(args.worker_base_port, args.worker_base_port + 8 + 8)
    assert ports.stop <= 30000  # below Linux's 32768-60999 and Kubernetes' NodePorts too
    assert args.port == 50051  # the gateway keeps its conventional port


def test_supervision_settings_make_the_restart_policy() -> None:
    policy = launcher.restart_policy(_up())
    assert (policy.delay_s, policy.max_delay_s, policy.limit, policy.window_s) == (
        0.5,
        30.0,
        5,
        60.0,
    )
    custom = _up("--restart-delay=0.1", "--restart-limit=2", "--restart-window=5")
    assert launcher.restart_policy(custom).limit == 2
    assert launcher.restart_policy(custom).delay(1) == 0.2
    assert launcher.restart_policy(_up("--keep-going")).limit == 0
    assert not _up().fail_fast and _up("--fail-fast").fail_fast


@pytest.mark.parametrize(
    "flags",
    [
        ("--fail-fast", "--keep-going"),
        ("--restart-limit=-1",),
        ("--restart-delay=0",),
        ("--kv-encrypt", "--kv-backend=gloo"),  # every worker would refuse it
    ],
)
def test_contradictory_supervision_settings_are_refused(
    flags: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert launcher.run_cluster(_up(*flags)) == 2
    assert "pdserve up: " in capsys.readouterr().err
