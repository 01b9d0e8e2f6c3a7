"""deploy/k8s rendered and checked without a cluster.

Every overlay is rendered (tests/deploy/kustomize_lite.py; compared with ``kubectl kustomize``
where kubectl exists), every built-in object validates strictly with kubernetes-validate, and
the objects are checked against what the processes really do: the ports they listen on (from
their own CLI parser), the gRPC services their health servicers report, their graceful-stop
grace period (the decode tier's against live KV migration), and the Services that tie the
tiers together.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml

from decode_service.servicer import TIER as DECODE_TIER
from gateway import server as gateway_server
from prefill_service.servicer import TIER as PREFILL_TIER
from tests.deploy import kustomize_lite
from tests.deploy.manifests import (
    EXAMPLE_SECRETS,
    OVERLAYS,
    PLANNED_FLAGS,
    TIERS,
    by_kind,
    cli_defaults,
    cli_flags,
    container_env,
    cpu_cores,
    env_flag,
    named_ports,
    only_container,
    overlay_dir,
    parse_command_line,
    render_overlay,
    selects,
    tier_of,
)

Obj = dict[str, Any]

KUBERNETES_VERSIONS = ("1.30.0", "1.33.0", "1.37.0")
"""Oldest supported (preStop sleep is on by default from 1.30), a common one, the newest known."""
BUILT_IN_KINDS = {"Namespace", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget"}
CUSTOM_KINDS = {"ScaledObject"}  # checked against KEDA's CRD schema in test_keda.py
MIN_STARTUP_BUDGET_S = 120  # model load, including a first-time conversion
SHUTDOWN_MARGIN_S = 5
DNS_TTL_S = 5
"""CoreDNS's TTL for Service records (its kubernetes plugin's default): how stale a gateway's
view of the headless Services may be on top of its own --resolve-interval."""
ENDPOINT_PROPAGATION_S = 1
"""A pod's readiness to its EndpointSlice and CoreDNS."""
MAX_DECODE_PRE_STOP_S = 10
"""A decode pod starts moving its streams on SIGTERM: a longer preStop only delays that."""

HEALTH_SERVICE = {
    "gateway": gateway_server.SERVICE_NAME,
    "prefill": PREFILL_TIER.service_name,
    "decode": DECODE_TIER.service_name,
}


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objects(overlay: str) -> list[Obj]:
    return render_overlay(overlay)


def _deployments(objects: list[Obj]) -> dict[str, Obj]:
    """Deployments by tier; exactly one per tier."""
    deployments = by_kind(objects, "Deployment")
    tiers = {tier_of(d): d for d in deployments.values()}
    assert sorted(tiers) == sorted(TIERS), sorted(tiers)
    return tiers


def _namespace(objects: list[Obj]) -> str:
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    assert len(namespaces) == 1, namespaces
    return namespaces.pop()


def _port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


# --------------------------------------------------------------------------------------------
# Rendering and schema validation
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_renderer_agrees_with_kubectl_kustomize(overlay: str) -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(overlay_dir(overlay))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    real = {kustomize_lite.key(o): o for o in yaml.safe_load_all(result.stdout) if o}
    ours = {kustomize_lite.key(o): o for o in render_overlay(overlay)}
    assert sorted(ours) == sorted(real)
    for identity, obj in real.items():
        assert ours[identity] == obj, f"{identity} differs from kubectl kustomize"


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Any) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        "resources: []\nconfigMapGenerator:\n  - name: x\n    literals: [a=b]\n"
    )
    with pytest.raises(kustomize_lite.KustomizeError, match="configMapGenerator"):
        kustomize_lite.render(tmp_path)


def test_overlays_render_the_expected_objects(objects: list[Obj]) -> None:
    kinds = {o["kind"] for o in objects}
    assert kinds == BUILT_IN_KINDS | CUSTOM_KINDS
    assert _namespace(objects) == "pdserve"
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pdserve", obj["kind"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_built_in_object_validates_strictly(objects: list[Obj], version: str) -> None:
    checked = 0
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(obj, version, strict=True)
        checked += 1
    assert checked == sum(o["kind"] in BUILT_IN_KINDS for o in objects)


def test_strict_validation_catches_a_misspelled_field(objects: list[Obj]) -> None:
    deployment = by_kind(objects, "Deployment")["decode"]
    only_container(deployment)["readinesProbe"] = {"grpc": {"port": 50071}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


# --------------------------------------------------------------------------------------------
# Containers: command lines, ports, probes
# --------------------------------------------------------------------------------------------


def test_every_container_command_line_is_accepted_by_pdserve(objects: list[Obj]) -> None:
    for tier, deployment in _deployments(objects).items():
        args = parse_command_line(only_container(deployment), objects)
        assert args.command == tier


def test_every_pdserve_variable_is_a_flag_of_the_tier(objects: list[Obj]) -> None:
    for tier, deployment in _deployments(objects).items():
        flags = cli_flags(tier) | PLANNED_FLAGS
        env = container_env(only_container(deployment), objects)
        config_map = by_kind(objects, "ConfigMap")["pdserve-config"]["data"]
        own = {v["name"] for v in only_container(deployment).get("env", [])}
        for variable in env.keys() | own:
            flag = env_flag(variable)
            if flag is None:
                continue
            # Shared ConfigMap keys may be meant for other tiers; a tier's own must be its flags.
            if variable in config_map and variable not in own:
                assert any(flag in cli_flags(t) for t in TIERS), f"{variable}: no tier has --{flag}"
            else:
                assert flag in flags, f"{tier}: {variable} is not a flag of pdserve {tier}"


def test_probes_are_native_grpc_on_the_port_the_process_listens_on(objects: list[Obj]) -> None:
    for tier, deployment in _deployments(objects).items():
        container = only_container(deployment)
        listen_port = _port_of(parse_command_line(container, objects).listen)
        assert named_ports(container)["grpc"] == listen_port, tier
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[probe_name]
            assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe_name
            assert probe["grpc"]["port"] == listen_port, f"{tier} {probe_name}"
        # Readiness follows the tier's own service, which goes NOT_SERVING first on SIGTERM
        # (the gateway's HTTP /health turns 503 at the same moment: one drain for both APIs).
        for probe_name in ("startupProbe", "readinessProbe"):
            assert container[probe_name]["grpc"]["service"] == HEALTH_SERVICE[tier], probe_name
        assert container["livenessProbe"]["grpc"].get("service", "") == ""
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= MIN_STARTUP_BUDGET_S, f"{tier}: startup probe allows only {budget}s"


def test_gateway_serves_the_http_api_on_its_http_port(objects: list[Obj]) -> None:
    """The OpenAI-compatible API listens on --listen's host at --http-port: that must be the
    container port named ``http``, reachable from other pods, and the gateway's only HTTP API
    port (workers have none)."""
    deployments = _deployments(objects)
    container = only_container(deployments["gateway"])
    args = parse_command_line(container, objects)
    assert args.http_port, "the gateway's HTTP API is off (--http-port 0)"
    assert args.http_port == cli_defaults("gateway").http_port, "not pdserve's default port"
    ports = named_ports(container)
    assert ports["http"] == args.http_port
    assert len(set(ports.values())) == len(ports), f"gateway ports collide: {ports}"
    assert args.listen.rpartition(":")[0] in {"0.0.0.0", "[::]"}, (
        f"--listen={args.listen}: the HTTP API binds --listen's host; other pods cannot reach it"
    )
    for tier in ("prefill", "decode"):
        assert "http" not in named_ports(only_container(deployments[tier])), tier


def test_gateway_services_expose_the_http_api(objects: list[Obj]) -> None:
    services = by_kind(objects, "Service")
    gateway_port = named_ports(only_container(_deployments(objects)["gateway"]))["http"]
    for name in ("gateway", "gateway-headless"):
        (port,) = (p for p in services[name]["spec"]["ports"] if p["name"] == "http")
        assert port["targetPort"] == "http" and port["port"] == gateway_port, name
        # Plain HTTP/1.1 (SSE streams), not h2c like the gRPC port.
        assert port.get("appProtocol") == "http", name


def test_graceful_shutdown_fits_the_termination_grace_period(objects: list[Obj]) -> None:
    for tier, deployment in _deployments(objects).items():
        pod = deployment["spec"]["template"]["spec"]
        container = only_container(deployment)
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        readiness = container["readinessProbe"]
        # Endpoints drop the pod once it is deleted; the sleep covers propagation (kube-proxy,
        # DNS, Envoy's 5 s re-resolution) and at least one readiness period.
        assert pre_stop >= max(readiness["periodSeconds"], 5), tier
        # The grace the process really gets (--shutdown-grace / PDSERVE_SHUTDOWN_GRACE, or its
        # default), as pdserve parses the container's command line and environment.
        grace_s = float(parse_command_line(container, objects).shutdown_grace)
        needed = pre_stop + grace_s + SHUTDOWN_MARGIN_S
        assert needed <= pod["terminationGracePeriodSeconds"] <= needed + 30, (
            f"{tier}: terminationGracePeriodSeconds should be about preStop ({pre_stop}s) + "
            f"pdserve's stop grace ({grace_s}s) + margin"
        )


def test_decode_drain_fits_live_kv_migration(objects: list[Obj]) -> None:
    """A draining decode pod moves its streams to the other decode pods on SIGTERM
    (gateway/migration.py): the manifests must leave migration on, not hold it back behind a
    long preStop, give each move the time the gateway allows it, and let a rollout's surge pod
    (where the streams usually go) reach every gateway's view before the old pod drains."""
    deployments = _deployments(objects)
    decode = deployments["decode"]
    container = only_container(decode)
    args = parse_command_line(container, objects)
    gateway = parse_command_line(only_container(deployments["gateway"]), objects)
    assert args.no_migration is False, "decode pods drain by migration (no --no-migration)"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop <= MAX_DECODE_PRE_STOP_S, (
        f"decode preStop {pre_stop}s: SIGTERM starts the migration, a long sleep only delays it"
    )
    # The gateway gives up on a move after --kv-arrival-timeout (then re-prefills the stream
    # elsewhere); the drain must not cut a move before that.
    move_limit = float(gateway.kv_arrival_timeout)
    assert move_limit > 0, "the gateway's --kv-arrival-timeout must bound each move"
    assert float(args.shutdown_grace) >= move_limit + SHUTDOWN_MARGIN_S, (
        f"decode --shutdown-grace {args.shutdown_grace}s would cut moves the gateway still "
        f"allows ({move_limit}s)"
    )
    discovery = ENDPOINT_PROPAGATION_S + DNS_TTL_S + float(gateway.resolve_interval)
    from_ready_to_drain = decode["spec"]["minReadySeconds"] + pre_stop
    assert from_ready_to_drain >= discovery, (
        f"a rollout's new decode pod may be unknown to the gateways when the old one drains: "
        f"minReadySeconds + preStop = {from_ready_to_drain}s < {discovery}s"
    )


def test_pods_run_unprivileged_without_service_links(objects: list[Obj]) -> None:
    for tier, deployment in _deployments(objects).items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, tier
        assert pod["enableServiceLinks"] is False, tier  # no <SERVICE>_PORT noise in the env
        assert pod["automountServiceAccountToken"] is False, tier
        security = only_container(deployment)["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        if security.get("readOnlyRootFilesystem"):
            mounts = {m["mountPath"] for m in only_container(deployment)["volumeMounts"]}
            assert "/tmp" in mounts, f"{tier}: a read-only root needs a writable /tmp"


def test_rollouts_keep_capacity(objects: list[Obj]) -> None:
    for tier, deployment in _deployments(objects).items():
        strategy = deployment["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate", tier
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0, tier
        assert strategy["rollingUpdate"]["maxSurge"] >= 1, tier


# --------------------------------------------------------------------------------------------
# Services, addresses between tiers, disruption budgets
# --------------------------------------------------------------------------------------------


def _selected_deployment(service: Obj, objects: list[Obj]) -> Obj:
    selector = service["spec"]["selector"]
    matches = [
        d
        for d in by_kind(objects, "Deployment").values()
        if selects(selector, d["spec"]["template"]["metadata"]["labels"])
    ]
    assert len(matches) == 1, f"Service {service['metadata']['name']} selects {len(matches)}"
    return matches[0]


def test_services_target_named_ports_that_exist(objects: list[Obj]) -> None:
    services = by_kind(objects, "Service")
    assert set(services) == {"gateway", "gateway-headless", "prefill", "decode"}
    for name, service in services.items():
        container = only_container(_selected_deployment(service, objects))
        ports = {p["name"]: p for p in container["ports"]}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert isinstance(target, str), f"{name}: target ports by name"
            assert target in ports, f"{name}: targetPort {target} is not a container port"
            assert port["name"] == target
            assert port.get("protocol", "TCP") == ports[target].get("protocol", "TCP")
    for name, expected in {"prefill": {"grpc"}, "decode": {"grpc", "kv", "kv-stream"}}.items():
        assert services[name]["spec"]["clusterIP"] == "None", f"{name} must be headless"
        assert {p["name"] for p in services[name]["spec"]["ports"]} == expected
    assert services["gateway"]["spec"].get("clusterIP") != "None"
    assert services["gateway-headless"]["spec"]["clusterIP"] == "None"


def _resolve(address: str, objects: list[Obj]) -> tuple[Obj, int]:
    """A ``dns:///name.namespace.svc.cluster.local:port`` target (every pod behind the headless
    Service is a worker) -> (the Service, container port)."""
    assert address.startswith("dns:///"), f"{address}: use dns:/// so every pod is discovered"
    host, _, port_text = address.removeprefix("dns:///").rpartition(":")
    name, namespace, *rest = host.split(".")
    assert rest == ["svc", "cluster", "local"], f"{address}: use the Service's full DNS name"
    assert namespace == _namespace(objects), f"{address}: not the manifests' namespace"
    service = by_kind(objects, "Service")[name]
    port = next(p for p in service["spec"]["ports"] if p["port"] == int(port_text))
    container = only_container(_selected_deployment(service, objects))
    return service, named_ports(container)[port["targetPort"]]


def test_gateway_reaches_workers_through_their_headless_services(objects: list[Obj]) -> None:
    deployments = _deployments(objects)
    args = parse_command_line(only_container(deployments["gateway"]), objects)
    for tier, addresses in (("prefill", args.prefill), ("decode", args.decode)):
        assert len(addresses) == 1, f"--{tier}: one headless Service name, not pod addresses"
        service, container_port = _resolve(addresses[0], objects)
        assert service["spec"]["clusterIP"] == "None", f"--{tier} must name a headless Service"
        assert tier_of(_selected_deployment(service, objects)) == tier
        worker = parse_command_line(only_container(deployments[tier]), objects)
        assert container_port == _port_of(worker.listen), f"--{tier} port is not where it listens"


def test_decode_advertises_its_pod_ip_on_the_kv_port(objects: list[Obj]) -> None:
    container = only_container(_deployments(objects)["decode"])
    env_names = [v["name"] for v in container["env"]]
    assert env_names.index("POD_IP") < env_names.index("PDSERVE_KV_ADVERTISE"), (
        "$(POD_IP) only expands when POD_IP is defined earlier"
    )
    env = container_env(container, objects)
    args = parse_command_line(container, objects)
    kv_port = named_ports(container)["kv"]
    assert args.kv_advertise == env["PDSERVE_KV_ADVERTISE"]
    assert args.kv_advertise == f"tcp://{env['POD_IP']}:{kv_port}"
    assert args.kv_bind == f"tcp://0.0.0.0:{kv_port}"
    assert args.kv_stream_port == named_ports(container)["kv-stream"] != kv_port


def test_every_tier_has_a_disruption_budget(objects: list[Obj]) -> None:
    budgets = by_kind(objects, "PodDisruptionBudget").values()
    for tier, deployment in _deployments(objects).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        mine = [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)]
        assert len(mine) == 1, f"{tier}: {len(mine)} PodDisruptionBudgets"
        spec = mine[0]["spec"]
        if "minAvailable" in spec:
            assert deployment["spec"]["replicas"] > spec["minAvailable"], (
                f"{tier}: minAvailable {spec['minAvailable']} would block every drain"
            )
        else:
            assert spec["maxUnavailable"] >= 1, tier


# --------------------------------------------------------------------------------------------
# Metrics, resources, config and secrets
# --------------------------------------------------------------------------------------------


def test_prometheus_annotations_name_the_metrics_port(objects: list[Obj]) -> None:
    for tier, deployment in _deployments(objects).items():
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        container = only_container(deployment)
        port = named_ports(container)["metrics"]
        assert port == cli_defaults(tier).metrics_port, f"{tier}: not pdserve's default port"
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == port
        assert container_env(container, objects)["PDSERVE_METRICS_PORT"] == str(port)
        assert int(parse_command_line(container, objects).metrics_port) == port, tier


def test_resources_and_device_per_overlay(overlay: str, objects: list[Obj]) -> None:
    for tier, deployment in _deployments(objects).items():
        container = only_container(deployment)
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), tier
        assert "memory" in resources["limits"], f"{tier}: a memory limit bounds a leak"
        assert "cpu" not in resources["limits"], f"{tier}: CPU throttling stalls every stream"
        gpus = resources["limits"].get("nvidia.com/gpu")
        args = parse_command_line(container, objects)
        if tier == "gateway":
            assert gpus is None
            continue
        assert int(args.threads) == math.ceil(cpu_cores(resources["requests"]["cpu"]))
        if overlay == "gpu":
            assert gpus == "1" and resources["requests"]["nvidia.com/gpu"] == "1", tier
            assert args.device == "cuda", tier
            assert container["image"].endswith("-cuda")
        else:
            assert gpus is None, tier
            assert args.device == "cpu", tier


def test_workers_agree_on_the_kv_layout(objects: list[Obj]) -> None:
    deployments = _deployments(objects)
    layouts = set()
    for tier in ("prefill", "decode"):
        args = parse_command_line(only_container(deployments[tier]), objects)
        layouts.add((args.model, args.dtype, args.block_size))
    assert len(layouts) == 1, (
        f"prefill and decode must share model, dtype and block size: {layouts}"
    )


def test_example_secrets_are_placeholders_for_what_pods_refer_to(objects: list[Obj]) -> None:
    examples = kustomize_lite.load_documents(EXAMPLE_SECRETS)
    for secret in examples:
        kubernetes_validate.validate(secret, KUBERNETES_VERSIONS[-1], strict=True)
        assert secret["metadata"]["annotations"]["pdserve.dev/example"] == "true"
        for value in secret["stringData"].values():
            assert value.startswith("REPLACE-WITH-"), "example Secrets hold placeholders only"
    assert not by_kind(objects, "Secret"), "Secrets must not be part of the overlays"
    referenced = set()
    for deployment in by_kind(objects, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["optional"] is True
                referenced.add(volume["secret"]["secretName"])
        for var in only_container(deployment).get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["optional"] is True
                referenced.add(ref["name"])
    assert referenced == {s["metadata"]["name"] for s in examples}
