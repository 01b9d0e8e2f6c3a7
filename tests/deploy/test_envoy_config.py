"""deploy/envoy/envoy.yaml against Envoy's v3 API, the protos, the manifests and the gateway's
OpenAI-compatible HTTP routes.

No Envoy binary can be installed here: the config is parsed into
``envoy.config.bootstrap.v3.Bootstrap`` with xds-protos (Envoy's own API, generated for Python)
after importing every ``envoy.*_pb2`` module, so every ``typed_config`` resolves to its real
message. That rejects unknown fields, bad durations and bad enum values; it does not run
Envoy's PGV rules or cross-reference checks, which the tests below do for what matters.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2, json_format
from google.protobuf.message import Message

from gateway.openai_api.app import ROUTES as OPENAI_ROUTES
from protos.build import DESCRIPTOR_SET
from tests.deploy.manifests import DEPLOY, ROOT, by_kind, named_ports, only_container
from tests.deploy.manifests import render_overlay as render

ENVOY_CONFIG = DEPLOY / "envoy" / "envoy.yaml"
NGINX_SNIPPET = DEPLOY / "nginx" / "pdserve-grpc.conf"
WORST_TTFT_S = 60.0
"""Time-to-first-token budget (queue + a long prompt's prefill) that idle timeouts must exceed."""
GRPC_SERVER_MIN_PING_INTERVAL_S = 300.0
"""gRPC servers' default minimum interval between client pings (GOAWAY too_many_pings below)."""
SAFE_RETRY_ON = {"connect-failure", "refused-stream", "unavailable", "resource-exhausted"}
"""Conditions that can only be seen before the gateway sent response headers, i.e. before any
token reached the caller (gRPC conditions are read from headers; see envoy.yaml)."""

STREAMING_ROUTES = ("/v1/completions", "/v1/chat/completions")
"""OpenAI routes that stream (server-sent events with ``"stream": true``)."""
SAFE_HTTP_RETRY_ON = {"connect-failure", "refused-stream", "retriable-status-codes"}
SAFE_HTTP_RETRY_STATUSES = {429, 503}
"""Answers the gateway gives before a stream starts (admission shed, draining or no worker);
a started stream is a 200 whose failures arrive as events."""
BUFFERING_FILTERS = ("envoy.filters.http.buffer", "envoy.filters.http.compressor")
GRPC_CLUSTER = "pdserve_gateway"
HTTP_CLUSTER = "pdserve_gateway_http"

HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TRANSCODER = "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@functools.cache
def _import_envoy_api() -> int:
    """Import every envoy.*_pb2 module so Any-typed configs resolve; returns how many."""
    import envoy

    count = 0
    for module in pkgutil.walk_packages(envoy.__path__, "envoy."):
        if module.name.endswith("_pb2"):
            importlib.import_module(module.name)
            count += 1
    return count


def _parse(config: dict[str, Any]) -> Message:
    from envoy.config.bootstrap.v3 import bootstrap_pb2

    _import_envoy_api()
    return json_format.ParseDict(config, bootstrap_pb2.Bootstrap())


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(ENVOY_CONFIG.read_text())


@pytest.fixture(scope="module")
def bootstrap(raw: dict[str, Any]) -> Any:
    return _parse(raw)


@pytest.fixture(scope="module")
def hcm(bootstrap: Any) -> Any:
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2,
    )

    (listener,) = bootstrap.static_resources.listeners
    (chain,) = listener.filter_chains
    (network_filter,) = chain.filters
    assert network_filter.typed_config.TypeName() == HCM
    manager = http_connection_manager_pb2.HttpConnectionManager()
    assert network_filter.typed_config.Unpack(manager)
    return manager


@pytest.fixture(scope="module")
def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    path = ROOT / DESCRIPTOR_SET
    assert path.is_file(), f"{path} missing: run `python -m protos.build`"
    return descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())


def _services(descriptor_set: descriptor_pb2.FileDescriptorSet) -> dict[str, Any]:
    return {
        f"{f.package}.{s.name}": s
        for f in descriptor_set.file
        for s in f.service
        if f.name.startswith("protos/")
    }


def _unpack(any_message: Any) -> Message:
    from google.protobuf import symbol_database

    cls = symbol_database.Default().GetSymbol(any_message.TypeName())
    message = cls()
    assert any_message.Unpack(message)
    return message


def _http_filters(hcm: Any) -> dict[str, Message]:
    return {f.name: _unpack(f.typed_config) for f in hcm.http_filters}


def _duration_s(duration: Any) -> float:
    return duration.seconds + duration.nanos / 1e9


def test_every_envoy_api_module_imports() -> None:
    assert _import_envoy_api() > 500


def _clusters(bootstrap: Any) -> dict[str, Any]:
    return {c.name: c for c in bootstrap.static_resources.clusters}


def _first_route(virtual_host: Any, path: str) -> Any:
    """The route Envoy picks for ``path``: the first whose match (path or prefix) fits."""
    for route in virtual_host.routes:
        which = route.match.WhichOneof("path_specifier")
        if which == "path" and path.split("?")[0] == route.match.path:
            return route
        if which == "prefix" and path.startswith(route.match.prefix):
            return route
        assert which in {"path", "prefix"}, f"{route.name}: {which} matches are not modelled"
    raise AssertionError(f"no route for {path}")


def test_config_parses_into_the_bootstrap_message(bootstrap: Any) -> None:
    assert set(_clusters(bootstrap)) == {GRPC_CLUSTER, HTTP_CLUSTER}
    assert bootstrap.admin.address.socket_address.address == "127.0.0.1", "admin stays local"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("static_resources", "clusters", 0, "connect_timeout"), "two seconds"),
        (("static_resources", "clusters", 0, "lb_policy"), "FASTEST"),
        (("static_resources", "clusters", 0, "health_check"), []),
    ],
    ids=["bad-duration", "bad-enum", "unknown-field"],
)
def test_parsing_rejects_a_broken_config(raw: dict[str, Any], path: tuple, value: Any) -> None:
    import copy

    broken = copy.deepcopy(raw)
    node = broken
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    with pytest.raises(json_format.ParseError):
        _parse(broken)


def test_filters_run_in_a_working_order(hcm: Any) -> None:
    names = [f.name for f in hcm.http_filters]
    assert names == [
        "envoy.filters.http.cors",
        "envoy.filters.http.grpc_web",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]


def test_transcoder_serves_the_public_api_from_the_descriptor_set(
    hcm: Any, descriptor_set: descriptor_pb2.FileDescriptorSet
) -> None:
    transcoder = _http_filters(hcm)["envoy.filters.http.grpc_json_transcoder"]
    services = _services(descriptor_set)
    assert list(transcoder.services) == ["pdserve.v1.Generation"]
    assert Path(transcoder.proto_descriptor).name == DESCRIPTOR_SET.name
    for name in transcoder.services:
        assert name in services, f"{name} is not in {DESCRIPTOR_SET}"
        for method in services[name].method:
            rule = method.options.Extensions[annotations_pb2.http]
            assert rule.post and rule.body == "*", f"{name}.{method.name} has no HTTP mapping"
    generate = next(m for m in services["pdserve.v1.Generation"].method if m.name == "Generate")
    assert generate.options.Extensions[annotations_pb2.http].post == "/v1/generate"
    # google/api/annotations.proto must travel with the set for Envoy to read the mapping.
    assert "google/api/annotations.proto" in {f.name for f in descriptor_set.file}
    assert transcoder.print_options.stream_newline_delimited


def test_grpc_routes_cover_the_served_services_and_stream_safely(
    hcm: Any, descriptor_set: descriptor_pb2.FileDescriptorSet
) -> None:
    (virtual_host,) = hcm.route_config.virtual_hosts
    routes = {r.match.prefix: r for r in virtual_host.routes}
    transcoder = _http_filters(hcm)["envoy.filters.http.grpc_json_transcoder"]
    for service in transcoder.services:
        route = routes[f"/{service}/"]
        action = route.route
        assert action.cluster == "pdserve_gateway"
        assert action.HasField("timeout") and _duration_s(action.timeout) == 0, (
            "a stream needs the whole-response timeout off (Envoy's default is 15 s)"
        )
        assert _duration_s(action.max_stream_duration.max_stream_duration) >= 300
        retry = action.retry_policy
        conditions = set(retry.retry_on.split(","))
        assert conditions <= SAFE_RETRY_ON, f"unsafe retry conditions {conditions - SAFE_RETRY_ON}"
        assert 1 <= retry.num_retries.value <= 3
        assert retry.retry_back_off.HasField("base_interval")
    # Reflection stays private; nothing else reaches the gateway.
    assert not any("reflection" in prefix for prefix in routes)
    assert _duration_s(hcm.stream_idle_timeout) > WORST_TTFT_S
    assert hcm.codec_type == 0  # AUTO: HTTP/1.1 for gRPC-Web/JSON, HTTP/2 for gRPC


def test_cors_lets_grpc_web_callers_read_grpc_status(hcm: Any) -> None:
    (virtual_host,) = hcm.route_config.virtual_hosts
    policy = _unpack(virtual_host.typed_per_filter_config["envoy.filters.http.cors"])
    allowed = {h.strip() for h in policy.allow_headers.split(",")}
    exposed = {h.strip() for h in policy.expose_headers.split(",")}
    assert {"content-type", "x-grpc-web", "grpc-timeout"} <= allowed
    assert {"grpc-status", "grpc-message"} <= exposed
    assert "POST" in policy.allow_methods
    assert "GET" in policy.allow_methods, "GET /v1/models from browsers"
    assert "authorization" in allowed and "retry-after" in exposed


def test_gateway_cluster_is_http2_health_checked_and_points_at_the_gateway(
    bootstrap: Any,
) -> None:
    cluster = _clusters(bootstrap)[GRPC_CLUSTER]
    options = _unpack(cluster.typed_extension_protocol_options[HTTP_OPTIONS])
    assert options.explicit_http_config.HasField("http2_protocol_options"), "gRPC needs HTTP/2"
    keepalive = options.explicit_http_config.http2_protocol_options.connection_keepalive
    if keepalive.HasField("interval"):
        assert _duration_s(keepalive.interval) >= GRPC_SERVER_MIN_PING_INTERVAL_S
    (check,) = cluster.health_checks
    assert check.grpc_health_check.service_name == "pdserve.v1.Generation"
    assert cluster.outlier_detection.consecutive_local_origin_failure.value > 0
    assert cluster.outlier_detection.split_external_local_origin_errors

    assert _gateway_port_of(cluster) == ("grpc", 50051)


def _gateway_port_of(cluster: Any) -> tuple[str, int]:
    """The gateway container port (name, number) a cluster's one endpoint reaches, through the
    headless Service (every gateway pod)."""
    objects = render("cpu")
    (locality,) = cluster.load_assignment.endpoints
    (endpoint,) = locality.lb_endpoints
    address = endpoint.endpoint.address.socket_address
    name, namespace, *rest = address.address.split(".")
    assert rest == ["svc", "cluster", "local"]
    service = by_kind(objects, "Service")[name]
    assert service["metadata"]["namespace"] == namespace
    assert service["spec"]["clusterIP"] == "None", "Envoy must see every gateway pod"
    (port,) = (p for p in service["spec"]["ports"] if p["port"] == address.port_value)
    gateway = by_kind(objects, "Deployment")["gateway"]
    assert service["spec"]["selector"].items() <= (
        gateway["spec"]["template"]["metadata"]["labels"].items()
    )
    target = port["targetPort"]
    return target, named_ports(only_container(gateway))[target]


def test_openai_routes_reach_the_gateway_http_port_unbuffered(hcm: Any) -> None:
    (virtual_host,) = hcm.route_config.virtual_hosts
    for path in OPENAI_ROUTES:
        route = _first_route(virtual_host, path)
        assert route.match.path == path, f"{path}: match the exact path, not a prefix"
        action = route.route
        assert action.cluster == HTTP_CLUSTER, path
        if path in STREAMING_ROUTES:
            assert action.HasField("timeout") and _duration_s(action.timeout) == 0, (
                f"{path}: a stream needs the whole-response timeout off (Envoy's default: 15 s)"
            )
            assert _duration_s(action.idle_timeout) > WORST_TTFT_S, path
            assert _duration_s(action.max_stream_duration.max_stream_duration) >= 300, path
        else:
            assert 0 < _duration_s(action.timeout) <= 60, f"{path}: a short call, bounded"
        retry = action.retry_policy
        if retry.retry_on:
            conditions = set(retry.retry_on.split(","))
            assert conditions <= SAFE_HTTP_RETRY_ON, f"{path}: unsafe {conditions}"
            assert set(retry.retriable_status_codes) <= SAFE_HTTP_RETRY_STATUSES, path
            assert 1 <= retry.num_retries.value <= 3, path
            assert retry.retry_back_off.HasField("base_interval"), path
    # Server-sent events must flow event by event: nothing that holds back a response body.
    names = {f.name for f in hcm.http_filters}
    assert not names & set(BUFFERING_FILTERS), names & set(BUFFERING_FILTERS)
    assert _duration_s(hcm.stream_idle_timeout) > WORST_TTFT_S


def test_route_order_keeps_the_json_transcoding_and_grpc_routes(hcm: Any) -> None:
    """The transcoder rewrites POST /v1/generate to the gRPC path and clears the route cache;
    before that (CORS reads the route) and for everything it leaves alone, the first matching
    route decides."""
    (virtual_host,) = hcm.route_config.virtual_hosts
    assert _first_route(virtual_host, "/pdserve.v1.Generation/Generate").route.cluster == (
        GRPC_CLUSTER
    )
    assert _first_route(virtual_host, "/grpc.health.v1.Health/Check").route.cluster == (
        GRPC_CLUSTER
    )
    for path in ("/v1/generate", "/v1/embeddings", "/v1/completions/x", "/v1/chat"):
        route = _first_route(virtual_host, path)
        assert route.name == "json_unmatched", f"{path} goes to {route.name}"
        assert route.direct_response.status == 404
    assert _first_route(virtual_host, "/v1/models?x=1").route.cluster == HTTP_CLUSTER


def test_http_cluster_is_http1_health_checked_on_the_gateway_http_port(bootstrap: Any) -> None:
    from gateway.openai_api.http_server import HttpServer

    cluster = _clusters(bootstrap)[HTTP_CLUSTER]
    options = _unpack(cluster.typed_extension_protocol_options[HTTP_OPTIONS])
    assert options.explicit_http_config.HasField("http_protocol_options"), "HTTP/1.1 upstream"
    # Reused connections must be dropped by Envoy before the gateway's keep-alive closes them.
    server = HttpServer(lambda scope, receive, send: None, "127.0.0.1", 0)
    try:
        keep_alive_s = server.server.config.timeout_keep_alive
    finally:
        server.sock.close()
    idle = options.common_http_protocol_options.idle_timeout
    assert 0 < _duration_s(idle) < keep_alive_s, (
        f"upstream idle timeout {_duration_s(idle)}s must be below the gateway's "
        f"{keep_alive_s}s keep-alive"
    )
    (check,) = cluster.health_checks
    assert check.http_health_check.path == "/health"
    assert "/health" in OPENAI_ROUTES
    assert cluster.outlier_detection.consecutive_local_origin_failure.value > 0
    assert _gateway_port_of(cluster) == ("http", 8000)


@pytest.mark.parametrize("directive", ["grpc_read_timeout", "proxy_read_timeout"])
def test_proxy_idle_timeouts_exceed_the_worst_ttft(directive: str) -> None:
    snippet = NGINX_SNIPPET.read_text()
    lines = [ln for ln in snippet.splitlines() if ln.strip().startswith(directive + " ")]
    assert lines, f"{directive} not set"
    for line in lines:
        value = line.split()[1].rstrip(";")
        assert value.endswith("s") and float(value[:-1]) > WORST_TTFT_S, line
