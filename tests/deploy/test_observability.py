"""Grafana dashboard and Prometheus scrape config against the metrics contract and the pods.

The scrape config's relabelling is run here on the targets Kubernetes service discovery would
produce for the rendered pods (every declared container port of every pod, with its labels and
annotations as ``__meta_kubernetes_*`` labels), so the test shows which address and path each
pod is scraped at. PromQL is checked by tests/deploy/metrics_contract.py everywhere, and by
``promtool check rules`` where promtool is installed (developer machines; CI has none).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import (
    DEPLOY,
    OVERLAYS,
    by_kind,
    named_ports,
    only_container,
    render_overlay,
    tier_of,
)
from tests.deploy.metrics_contract import (
    GPU_DEVICE_METRICS,
    METRICS,
    check_promql,
    metric_of,
    series_names,
)

Obj = dict[str, Any]

DASHBOARD = DEPLOY / "grafana" / "pdserve-dashboard.json"
DASHBOARD_BUILDER = DEPLOY / "grafana" / "build_dashboard.py"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"


def _builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pdserve_build_dashboard", DASHBOARD_BUILDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p["targets"]]


def _keda_queries() -> list[str]:
    return [
        trigger["metadata"]["query"]
        for overlay in OVERLAYS
        for scaled in by_kind(render_overlay(overlay), "ScaledObject").values()
        for trigger in scaled["spec"]["triggers"]
    ]


# --------------------------------------------------------------------------------------------
# Grafana
# --------------------------------------------------------------------------------------------


def test_dashboard_json_is_what_the_builder_writes() -> None:
    assert DASHBOARD.read_text() == _builder().render(), (
        "pdserve-dashboard.json is stale: run python deploy/grafana/build_dashboard.py"
    )


def test_dashboard_layout_is_valid(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in _panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert [t["refId"] for t in panel["targets"]] == [
            chr(65 + i) for i in range(len(panel["targets"]))
        ]


def test_dashboard_queries_use_exported_metrics_correctly(dashboard: dict[str, Any]) -> None:
    for expr in _dashboard_queries(dashboard):
        assert not check_promql(expr), f"{expr}: {check_promql(expr)}"
        assert 'namespace=~"$namespace"' in expr, expr


def test_dashboard_charts_every_exported_metric(dashboard: dict[str, Any]) -> None:
    charted = {
        known[0]
        for expr in _dashboard_queries(dashboard)
        for name in series_names(expr)
        if (known := metric_of(name))
    }
    assert charted == set(METRICS), f"not charted: {sorted(set(METRICS) - charted)}"


def test_latency_percentiles_are_per_tier(dashboard: dict[str, Any]) -> None:
    for expr in _dashboard_queries(dashboard):
        if "histogram_quantile" in expr:
            assert "by (le, tier)" in expr, expr


def test_namespace_variable_reads_the_scrape_job(dashboard: dict[str, Any]) -> None:
    (job,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "namespace")
    assert f'job="{job["job_name"]}"' in variable["query"]["query"]


# --------------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------------


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _discovered_targets(objects: list[Obj], pod_ip: str) -> list[dict[str, str]]:
    """What ``kubernetes_sd_configs: role: pod`` lists for one running pod of each Deployment."""
    targets = []
    for deployment in by_kind(objects, "Deployment").values():
        template = deployment["spec"]["template"]
        container = only_container(deployment)
        meta = {
            "__meta_kubernetes_namespace": deployment["metadata"]["namespace"],
            "__meta_kubernetes_pod_name": f"{deployment['metadata']['name']}-7d4b9c-x2x7q",
            "__meta_kubernetes_pod_ip": pod_ip,
            "__meta_kubernetes_pod_phase": "Running",
            "__meta_kubernetes_pod_node_name": "node-1",
            "__meta_kubernetes_pod_container_name": container["name"],
        }
        for k, v in template["metadata"]["labels"].items():
            meta[f"__meta_kubernetes_pod_label_{_sanitize(k)}"] = v
        for k, v in template["metadata"].get("annotations", {}).items():
            meta[f"__meta_kubernetes_pod_annotation_{_sanitize(k)}"] = v
        host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
        for port in container["ports"]:
            targets.append(
                meta
                | {
                    "__address__": f"{host}:{port['containerPort']}",
                    "__meta_kubernetes_pod_container_port_name": port.get("name", ""),
                    "__meta_kubernetes_pod_container_port_number": str(port["containerPort"]),
                }
            )
    return targets


def _relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus relabelling (keep, drop, replace) of one target; None when dropped."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule["source_labels"])
        pattern = re.compile(rule.get("regex", "(.*)"))
        match = pattern.fullmatch(value)  # Prometheus anchors every regex
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            template = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))
            result = match.expand(template)
            if result:
                labels[rule["target_label"]] = result
            else:
                labels.pop(rule["target_label"], None)
        assert action in ("keep", "drop", "replace"), f"relabel action {action} not simulated"
    return labels


@pytest.mark.parametrize("pod_ip", ["10.1.2.3", "fd00:10:244::1f"], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scrape_config_scrapes_each_pod_once_on_its_metrics_port(overlay: str, pod_ip: str) -> None:
    objects = render_overlay(overlay)
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod"
    deployments = by_kind(objects, "Deployment")
    namespaces = {d["metadata"]["namespace"] for d in deployments.values()}
    assert namespaces <= set(sd["namespaces"]["names"])

    scraped: dict[str, dict[str, str]] = {}
    for target in _discovered_targets(objects, pod_ip):
        kept = _relabel(
            target | {"__metrics_path__": "/metrics", "job": job["job_name"]},
            job["relabel_configs"],
        )
        if kept is not None:
            assert kept["component"] not in scraped, f"{kept['component']} scraped twice"
            scraped[kept["component"]] = kept
    assert set(scraped) == {tier_of(d) for d in deployments.values()}
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    for deployment in deployments.values():
        labels = scraped[tier_of(deployment)]
        port = named_ports(only_container(deployment))["metrics"]
        assert labels["__address__"] == f"{host}:{port}"
        assert labels["__metrics_path__"] == "/metrics"
        assert labels["namespace"] == deployment["metadata"]["namespace"]
        assert labels["pod"].startswith(deployment["metadata"]["name"])


def test_scrape_config_skips_pods_that_are_not_running() -> None:
    (job,) = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    for target in _discovered_targets(render_overlay("cpu"), "10.1.2.3"):
        pending = target | {"__meta_kubernetes_pod_phase": "Pending"}
        assert _relabel(pending, job["relabel_configs"]) is None


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_parses_every_query(tmp_path: Path, dashboard: dict[str, Any]) -> None:
    queries = _dashboard_queries(dashboard) + _keda_queries()
    rules = {
        "groups": [
            {
                "name": "pdserve-queries",
                "rules": [
                    {
                        "record": f"pdserve:query_check:{i}",
                        "expr": q.replace("$__rate_interval", "5m").replace("$namespace", ".*"),
                    }
                    for i, q in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_collector_exports_the_charted_gpu_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-device GPU series, from pdserve's collector over a fake NVML with one GPU."""
    fake_nvml = SimpleNamespace(
        NVMLError=RuntimeError,
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetUtilizationRates=lambda handle: SimpleNamespace(gpu=50),
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(used=1 << 30, total=80 << 30),
        nvmlDeviceGetPowerUsage=lambda handle: 300_000,
        nvmlDeviceGetTemperature=lambda handle, sensor: 60,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml)
    from server_runtime.gpu import GpuCollector

    families = {f.name: f for f in GpuCollector("decode").collect()}
    assert set(families) == GPU_DEVICE_METRICS | {"pdserve_gpu_available"}
    for name in GPU_DEVICE_METRICS:
        (sample,) = families[name].samples
        assert sample.labels == {"tier": "decode", "gpu": "0"}, name
