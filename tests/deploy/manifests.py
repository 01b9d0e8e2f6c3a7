"""What the deploy/ tests share: paths, rendered overlays, and a container's view of itself.

A container's command line is checked the way it will run: the environment is built as the
kubelet builds it (ConfigMap ``envFrom``, then ``env`` in order with ``$(VAR)`` references
expanded, the pod IP and CPU request filled in), and the arguments are parsed by pdserve's own
CLI parser with that environment, so a flag or variable pdserve does not accept fails here.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.deploy import kustomize_lite

Obj = dict[str, Any]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
EXAMPLE_SECRETS = K8S / "examples" / "secrets.example.yaml"

TIERS = ("gateway", "prefill", "decode")
PLANNED_FLAGS = {"auth-token", "kv-key"}
"""PDSERVE_* variables the manifests set that are no flag of pdserve: the API's bearer token and
the KV channel key, secrets pdserve reads from the environment only."""
FAKE_POD_IP = "10.12.34.56"


def overlay_dir(name: str) -> Path:
    return K8S / "overlays" / name


@functools.cache
def _render_cached(name: str) -> tuple[Obj, ...]:
    return tuple(kustomize_lite.render(overlay_dir(name)))


def render_overlay(name: str) -> list[Obj]:
    """The overlay's objects (a fresh copy: tests may change them)."""
    return copy.deepcopy(list(_render_cached(name)))


def by_kind(objects: list[Obj], kind: str) -> dict[str, Obj]:
    """Objects of ``kind`` by name."""
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def only_container(deployment: Obj) -> Obj:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deployment['metadata']['name']}: one container expected"
    return containers[0]


def tier_of(deployment: Obj) -> str:
    return deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def named_ports(container: Obj) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)`` expansion: defined variables only, others left as written."""
    return _REFERENCE.sub(lambda m: env.get(m.group(1), m.group(0)), value)


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def container_env(container: Obj, objects: list[Obj]) -> dict[str, str]:
    """The environment the kubelet gives ``container`` (optional missing Secrets left out)."""
    config_maps = by_kind(objects, "ConfigMap")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]
        assert ref["name"] in config_maps, f"envFrom names a missing ConfigMap {ref['name']}"
        env.update({k: str(v) for k, v in config_maps[ref["name"]]["data"].items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "status.podIP", source
            env[var["name"]] = FAKE_POD_IP
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            assert ref["containerName"] == container["name"], ref
            assert ref["resource"] == "requests.cpu" and ref.get("divisor") == "1", ref
            request = container["resources"]["requests"]["cpu"]
            env[var["name"]] = str(math.ceil(cpu_cores(request)))
        elif "secretKeyRef" in source:
            assert source["secretKeyRef"].get("optional") is True, (
                f"{var['name']}: Secrets are created out of band; refer to them as optional"
            )
        else:
            raise AssertionError(f"unexpected env source {source}")
    return env


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parse_command_line(container: Obj, objects: list[Obj]) -> argparse.Namespace:
    """``container``'s command line as pdserve's CLI parses it in the container's environment."""
    from pdserve.cli import build_parser

    env = container_env(container, objects)
    argv = [expand(a, env) for a in container.get("command", []) + container.get("args", [])]
    assert argv[:1] == ["pdserve"], f"{container['name']}: the command must be pdserve: {argv}"
    errors = io.StringIO()
    with _environment(env), contextlib.redirect_stderr(errors):
        try:
            return build_parser().parse_args(argv[1:])
        except SystemExit as exc:
            raise AssertionError(
                f"pdserve rejects {container['name']}'s command line {argv}: {errors.getvalue()}"
            ) from exc


def cli_defaults(command: str) -> argparse.Namespace:
    """``pdserve <command>`` with no flags and no PDSERVE_* variables: its defaults."""
    from pdserve.cli import build_parser

    with _environment({}):
        return build_parser().parse_args([command])


def cli_flags(command: str) -> set[str]:
    """Long flags (without ``--``) of ``pdserve <command>``."""
    from pdserve.cli import build_parser

    parser = build_parser()
    subparsers = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    return {
        option[2:]
        for action in subparsers[command]._actions
        for option in action.option_strings
        if option.startswith("--")
    }


def env_flag(variable: str) -> str | None:
    """``PDSERVE_NUM_BLOCKS`` -> ``num-blocks``; None for variables that are not flags."""
    if not variable.startswith("PDSERVE_"):
        return None
    return variable.removeprefix("PDSERVE_").lower().replace("_", "-")
