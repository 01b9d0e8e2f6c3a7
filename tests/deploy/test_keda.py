"""The overlays' KEDA ScaledObjects: KEDA's documented spec, and what they scale on.

The schema in tests/deploy/keda/ is hand-written from KEDA's ScaledObject specification (see
its header), strict the way the API server's field validation is: unknown fields are errors.
On top of the schema, the checks KEDA's admission webhook or a careful reviewer would make: the
target exists and leaves its replica count to the autoscaler, both directions have a
stabilization window, and each tier scales on the signal that measures its bottleneck, from
metrics pdserve exports.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.manifests import OVERLAYS, by_kind, render_overlay, tier_of
from tests.deploy.metrics_contract import (
    GATEWAY_ONLY,
    MetricType,
    check_promql,
    metric_of,
    series_names,
)

Obj = dict[str, Any]

SCHEMA_FILE = Path(__file__).with_name("keda") / "scaledobject-v1alpha1.schema.yaml"
SCALING_SIGNALS = {
    # tier: metrics whose rise means that tier is short of capacity
    "prefill": {"pdserve_num_requests_waiting", "pdserve_time_to_first_token_seconds"},
    "decode": {"pdserve_kv_cache_usage_ratio", "pdserve_inter_token_latency_seconds"},
}


def strict(schema: Any) -> Any:
    """``schema`` with unknown properties rejected wherever the CRD lists the known ones."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = strict(yaml.safe_load(SCHEMA_FILE.read_text()))
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


@pytest.fixture(params=OVERLAYS)
def objects(request: pytest.FixtureRequest) -> list[Obj]:
    return render_overlay(str(request.param))


def _scaled_objects(objects: list[Obj]) -> dict[str, Obj]:
    scaled = by_kind(objects, "ScaledObject")
    assert scaled, "no ScaledObjects rendered"
    return scaled


def test_scaled_objects_match_the_keda_crd_schema(
    objects: list[Obj], validator: jsonschema.protocols.Validator
) -> None:
    for name, scaled in _scaled_objects(objects).items():
        assert scaled["apiVersion"] == "keda.sh/v1alpha1", name
        errors = [e.message for e in validator.iter_errors(scaled)]
        assert not errors, f"ScaledObject {name}: {errors}"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s["spec"]["triggers"][0]["metadata"].update(threshold=4),  # number, not string
        lambda s: s["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"][
            "scaleUp"
        ].update(stabilisationWindowSeconds=30),  # misspelled
        lambda s: s["spec"].pop("scaleTargetRef"),
        lambda s: s["spec"].update(minReplicaCount="1"),
        lambda s: s["spec"].update(pollingInterva=15),  # misspelled, top of spec
        lambda s: s["spec"]["scaleTargetRef"].pop("name"),
        lambda s: s["spec"]["triggers"][0].pop("metadata"),
        lambda s: s["spec"]["triggers"][0].update(metricType="Average"),
        lambda s: s["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"][
            "scaleDown"
        ].update(selectPolicy="max"),
        lambda s: s["spec"].update(minReplicaCount=-1),
    ],
    ids=[
        "numeric-threshold",
        "misspelled-field",
        "no-target",
        "string-count",
        "misspelled-spec-field",
        "no-target-name",
        "no-trigger-metadata",
        "unknown-metric-type",
        "unknown-select-policy",
        "negative-count",
    ],
)
def test_schema_check_rejects_broken_objects(
    validator: jsonschema.protocols.Validator, mutate: Any
) -> None:
    scaled = copy.deepcopy(next(iter(_scaled_objects(render_overlay("cpu")).values())))
    mutate(scaled)
    assert list(validator.iter_errors(scaled)), "the schema check let a broken object through"


def test_each_worker_tier_scales_and_leaves_replicas_to_keda(objects: list[Obj]) -> None:
    deployments = by_kind(objects, "Deployment")
    targets = {}
    for name, scaled in _scaled_objects(objects).items():
        ref = scaled["spec"]["scaleTargetRef"]
        assert (ref.get("apiVersion"), ref.get("kind")) == ("apps/v1", "Deployment"), name
        assert ref["name"] in deployments, f"{name} targets a Deployment that does not exist"
        assert scaled["metadata"]["namespace"] == deployments[ref["name"]]["metadata"]["namespace"]
        deployment = deployments[ref["name"]]
        assert "replicas" not in deployment["spec"], (
            f"{ref['name']}: spec.replicas would reset the autoscaler on every apply"
        )
        targets[tier_of(deployment)] = scaled
    assert sorted(targets) == sorted(SCALING_SIGNALS)


def test_scaling_behaviour_is_stabilized(objects: list[Obj]) -> None:
    for name, scaled in _scaled_objects(objects).items():
        spec = scaled["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"], name
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        up, down = behavior["scaleUp"], behavior["scaleDown"]
        for rules in (up, down):
            assert 0 <= rules["stabilizationWindowSeconds"] <= 3600, name
            assert rules["policies"], name
            for policy in rules["policies"]:
                assert 0 < policy["periodSeconds"] <= 1800 and policy["value"] > 0, name
        assert down["stabilizationWindowSeconds"] > up["stabilizationWindowSeconds"] > 0, (
            f"{name}: scale down more cautiously than up, and not on a single sample"
        )


def test_triggers_query_the_signal_of_their_tier(objects: list[Obj]) -> None:
    deployments = by_kind(objects, "Deployment")
    for name, scaled in _scaled_objects(objects).items():
        tier = tier_of(deployments[scaled["spec"]["scaleTargetRef"]["name"]])
        namespace = scaled["metadata"]["namespace"]
        used = set()
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["type"] == "prometheus", name
            meta = trigger["metadata"]
            assert meta["serverAddress"].startswith("http"), name
            assert float(meta["threshold"]) > 0, name
            query = meta["query"]
            assert not check_promql(query), f"{name}: {check_promql(query)}"
            metrics = {metric_of(s) for s in series_names(query)}
            assert len(metrics) == 1, query
            metric, kind = metrics.pop()  # type: ignore[misc]
            used.add(metric)
            # Client-side latencies exist only at the gateway; the rest on the tier itself.
            source = "gateway" if metric in GATEWAY_ONLY else tier
            assert f'tier="{source}"' in query and f'namespace="{namespace}"' in query, query
            if kind is MetricType.GAUGE:
                # Summed over the tier, divided per pod by the HPA; a broken scrape must
                # error (the HPA then holds) rather than read as 0 and shrink the tier.
                assert trigger["metricType"] == "AverageValue", name
                assert query.startswith("sum("), query
                assert meta.get("ignoreNullValues") == "false", name
            else:
                # A latency quantile: proportional (Value); NaN without traffic becomes 0.
                assert kind is MetricType.HISTOGRAM and "histogram_quantile(" in query, query
                assert trigger["metricType"] == "Value", name
                assert query.rstrip().endswith("or vector(0)"), query
        assert used <= SCALING_SIGNALS[tier] and used, f"{name} scales on {used}"
