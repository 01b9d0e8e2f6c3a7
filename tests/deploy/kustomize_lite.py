"""A small kustomize renderer: exactly the features deploy/k8s uses, nothing more.

No kustomize can be installed from PyPI, so CI renders the overlays with this. It follows
kustomize v5 for:

* ``resources``: YAML files (several documents each) and folders holding a kustomization;
* ``namespace``: set on every namespaced object;
* ``labels``: ``pairs`` on every object's metadata, and with ``includeTemplates`` on pod
  templates (``includeSelectors`` must be false: selectors stay as written);
* ``patches``: strategic-merge patches from files, matched by kind and name, on built-in kinds
  only, with the merge keys Kubernetes declares for the lists deploy/k8s patches (containers by
  ``name``, env by ``name``, ports by ``containerPort``, volumes by ``name``, volume mounts by
  ``mountPath``), merged lists ordered as kustomize orders them; other lists are replaced;
* ``images``: ``newName``/``newTag`` for containers whose image name matches.

Anything else in a kustomization (generators, JSON patches, components, replacements, ...) is
refused with an error, so a manifest change that needs more fails loudly here rather than being
rendered wrongly. Where ``kubectl`` is on PATH, tests/deploy/test_k8s_manifests.py checks that
this renderer and ``kubectl kustomize`` produce the same objects.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

KUSTOMIZATION_FILE = "kustomization.yaml"
SUPPORTED_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "patches", "images"}
CLUSTER_SCOPED_KINDS = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "StorageClass",
    "PersistentVolume",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}
PATCHABLE_KINDS = WORKLOAD_KINDS | {"ConfigMap", "Secret", "Service", "PodDisruptionBudget"}

# Strategic-merge keys of the lists a patch may touch, by field name (as in the Kubernetes API's
# x-kubernetes-patch-merge-key). Lists not named here are replaced by the patch's list.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "ports": "containerPort",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not implement, or is inconsistent."""


def load_documents(path: Path) -> list[Obj]:
    """Every non-empty YAML document in ``path``."""
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def render(folder: Path) -> list[Obj]:
    """The objects ``kubectl kustomize folder`` would print (order aside)."""
    folder = folder.resolve()
    spec = load_documents(folder / KUSTOMIZATION_FILE)[0]
    unknown = set(spec) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{folder}: unsupported kustomization fields {sorted(unknown)}")

    objects: list[Obj] = []
    for entry in spec.get("resources", []):
        path = folder / entry
        objects.extend(render(path) if path.is_dir() else load_documents(path))
    _check_unique(objects, folder)

    for patch_entry in spec.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise KustomizeError(f"{folder}: only file patches without target: {patch_entry}")
        for patch in load_documents(folder / patch_entry["path"]):
            _apply_patch(objects, patch, folder)
    if "namespace" in spec:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED_KINDS:
                obj["metadata"]["namespace"] = spec["namespace"]
    for label_set in spec.get("labels", []):
        _apply_labels(objects, label_set, folder)
    for image in spec.get("images", []):
        _apply_image(objects, image, folder)
    return objects


def key(obj: Obj) -> tuple[str, str, str]:
    """Identity of an object: kind, namespace, name."""
    meta = obj["metadata"]
    return obj["kind"], meta.get("namespace", ""), meta["name"]


def _check_unique(objects: list[Obj], folder: Path) -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in objects:
        if key(obj) in seen:
            raise KustomizeError(f"{folder}: duplicate object {key(obj)}")
        seen.add(key(obj))


def _apply_patch(objects: list[Obj], patch: Obj, folder: Path) -> None:
    kind, name = patch["kind"], patch["metadata"]["name"]
    if kind not in PATCHABLE_KINDS:
        raise KustomizeError(f"{folder}: strategic merge on {kind} is not implemented")
    targets = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    if len(targets) != 1:
        raise KustomizeError(f"{folder}: patch for {kind}/{name} matches {len(targets)} objects")
    body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
    body["metadata"] = {k: v for k, v in patch["metadata"].items() if k != "name"}
    merged = strategic_merge(targets[0], body)
    targets[0].clear()
    targets[0].update(merged)


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """``patch`` merged into a copy of ``base`` (maps recursively, keyed lists by merge key)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        if any(k.startswith("$") for k in patch):
            raise KustomizeError(f"patch directives are not implemented: {sorted(patch)}")
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(patch, list) and isinstance(base, list) and field in MERGE_KEYS:
        # As kustomize orders a merged keyed list: the patch's items first, in the patch's
        # order (merged with their base item where one has the same key), then the base items
        # the patch did not name, in their order. So patching an env variable moves it first.
        merge_key = MERGE_KEYS[field]
        base_by_key = {item[merge_key]: item for item in base}
        patched = [
            strategic_merge(base_by_key[item[merge_key]], item)
            if item[merge_key] in base_by_key
            else copy.deepcopy(item)
            for item in patch
        ]
        named = {item[merge_key] for item in patch}
        return patched + [copy.deepcopy(b) for b in base if b[merge_key] not in named]
    return copy.deepcopy(patch)


def _apply_labels(objects: list[Obj], label_set: Obj, folder: Path) -> None:
    unknown = set(label_set) - {"pairs", "includeSelectors", "includeTemplates"}
    if unknown or label_set.get("includeSelectors", False):
        raise KustomizeError(f"{folder}: labels supports pairs and includeTemplates only")
    pairs = label_set["pairs"]
    for obj in objects:
        obj["metadata"].setdefault("labels", {}).update(pairs)
        if label_set.get("includeTemplates") and obj["kind"] in WORKLOAD_KINDS:
            template_meta = obj["spec"]["template"].setdefault("metadata", {})
            template_meta.setdefault("labels", {}).update(pairs)


def _apply_image(objects: list[Obj], image: Obj, folder: Path) -> None:
    unknown = set(image) - {"name", "newName", "newTag"}
    if unknown:
        raise KustomizeError(f"{folder}: images supports name, newName, newTag only")
    for obj in objects:
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        pod = obj["spec"]["template"]["spec"]
        for container in pod.get("containers", []) + pod.get("initContainers", []):
            name, tag = split_image(container["image"])
            if name != image["name"]:
                continue
            name, tag = image.get("newName", name), image.get("newTag", tag)
            container["image"] = f"{name}:{tag}" if tag else name


def split_image(image: str) -> tuple[str, str]:
    """``registry:5000/name:tag`` -> (``registry:5000/name``, ``tag``); no tag -> ``""``."""
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, ""
    return name, tag
