"""Write ``infra/schemas/manifests.schema.json``: JSON Schemas (2020-12) that the
manifests in ``infra/kuberay`` are validated against by ``tests/test_infra_manifests.py``,
offline, with no cluster.

Two sources, both recorded in the file's ``$comment``:

* **Core Kubernetes objects** (PodTemplateSpec, Service, NetworkPolicy,
  ServiceAccount, CronJob, Role, RoleBinding and everything they refer to):
  copied, descriptions stripped, from the *strict* schemas that the PyPI
  package ``kubernetes-validate`` ships (Apache-2.0; generated from the
  Kubernetes OpenAPI spec; strict = unknown fields are errors, like kubectl's
  default server-side field validation).
* **KubeRay CRDs** (RayCluster, RayJob, RayService, ``ray.io/v1``): no PyPI,
  npm or Debian package ships KubeRay's CRD ``openAPIV3Schema``, so the
  ``KUBERAY`` dict below is written by hand from KubeRay's documented API
  reference (the ``ray.io/v1`` CRD field reference for KubeRay 1.5-1.6) and
  covers only the fields listed there that these manifests may use; every
  object is closed (``additionalProperties: false``), so a misspelt or
  unknown field fails. It is *not* the operator's own schema: CEL rules and
  defaults are not reproduced. Pod templates inside it point at the core
  Kubernetes schema above.

Regenerate (after ``pip install kubernetes-validate==1.37.0`` anywhere)::

    python infra/schemas/generate.py            # writes the file
    python infra/schemas/generate.py --check    # exit 1 if the file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("manifests.schema.json")
K8S_VERSION = "v1.33.0"
KUBERNETES_VALIDATE = "1.37.0"
CORE_ROOTS = {
    "PodTemplateSpec": "io.k8s.api.core.v1.PodTemplateSpec",
    "Service": "io.k8s.api.core.v1.Service",
    "ServiceAccount": "io.k8s.api.core.v1.ServiceAccount",
    "NetworkPolicy": "io.k8s.api.networking.v1.NetworkPolicy",
    "CronJob": "io.k8s.api.batch.v1.CronJob",
    "Role": "io.k8s.api.rbac.v1.Role",
    "RoleBinding": "io.k8s.api.rbac.v1.RoleBinding",
}


def _core(name: str) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{CORE_ROOTS.get(name, name)}"}


def _closed(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    return out


INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
NON_NEG_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
POD_TEMPLATE = _core("PodTemplateSpec")

KUBERAY: dict[str, Any] = {
    "ray.io.v1.AuthOptions": _closed({
        "mode": {"enum": ["disabled", "token"]},
        "secretName": {"type": "string"},            # KubeRay >= 1.6
        "enableK8sTokenAuth": {"type": "boolean"},   # KubeRay >= 1.6, RayCluster only
    }),
    "ray.io.v1.AutoscalerOptions": _closed({
        "resources": _core("io.k8s.api.core.v1.ResourceRequirements"),
        "image": {"type": "string"},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "securityContext": _core("io.k8s.api.core.v1.SecurityContext"),
        "idleTimeoutSeconds": NON_NEG_INT32,
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
        "env": {"type": "array", "items": _core("io.k8s.api.core.v1.EnvVar")},
        "envFrom": {"type": "array", "items": _core("io.k8s.api.core.v1.EnvFromSource")},
        "volumeMounts": {"type": "array", "items": _core("io.k8s.api.core.v1.VolumeMount")},
    }),
    "ray.io.v1.HeadGroupSpec": _closed({
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": _core("Service"),
        "enableIngress": {"type": "boolean"},
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
    }, required=["rayStartParams", "template"]),
    "ray.io.v1.WorkerGroupSpec": _closed({
        "suspend": {"type": "boolean"},
        "groupName": {"type": "string", "minLength": 1},
        "replicas": NON_NEG_INT32,
        "minReplicas": NON_NEG_INT32,
        "maxReplicas": NON_NEG_INT32,
        "idleTimeoutSeconds": NON_NEG_INT32,
        "numOfHosts": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        "rayStartParams": STRING_MAP,
        "template": POD_TEMPLATE,
        "scaleStrategy": _closed({"workersToDelete": {"type": "array", "items": {"type": "string"}}}),
    }, required=["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"]),
    "ray.io.v1.RayClusterSpec": _closed({
        "suspend": {"type": "boolean"},
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "authOptions": {"$ref": "#/$defs/ray.io.v1.AuthOptions"},
        "autoscalerOptions": {"$ref": "#/$defs/ray.io.v1.AutoscalerOptions"},
        "headServiceAnnotations": STRING_MAP,
        "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "headGroupSpec": {"$ref": "#/$defs/ray.io.v1.HeadGroupSpec"},
        "rayVersion": {"type": "string"},
        "workerGroupSpecs": {"type": "array", "items": {"$ref": "#/$defs/ray.io.v1.WorkerGroupSpec"}},
    }, required=["headGroupSpec"]),
    "ray.io.v1.RayJobSpec": _closed({
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1, "maximum": 2**31 - 1},
        "backoffLimit": NON_NEG_INT32,
        "rayClusterSpec": {"$ref": "#/$defs/ray.io.v1.RayClusterSpec"},
        "submitterPodTemplate": POD_TEMPLATE,
        "metadata": STRING_MAP,
        "clusterSelector": STRING_MAP,
        "submitterConfig": _closed({"backoffLimit": NON_NEG_INT32}),
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "entrypoint": {"type": "string"},
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "entrypointResources": {"type": "string"},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "ttlSecondsAfterFinished": NON_NEG_INT32,
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "suspend": {"type": "boolean"},
    }),
    "ray.io.v1.RayServiceUpgradeStrategy": _closed({
        "type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]},
    }),
    "ray.io.v1.RayServiceSpec": _closed({
        "serveConfigV2": {"type": "string"},
        "rayClusterConfig": {"$ref": "#/$defs/ray.io.v1.RayClusterSpec"},
        "upgradeStrategy": {"$ref": "#/$defs/ray.io.v1.RayServiceUpgradeStrategy"},
        "serveService": _core("Service"),
        "excludeHeadPodFromServeSvc": {"type": "boolean"},
        "serviceUnhealthySecondThreshold": INT32,
        "deploymentUnhealthySecondThreshold": INT32,
        "rayClusterDeletionDelaySeconds": NON_NEG_INT32,
    }, required=["rayClusterConfig"]),
}
for _kind, _spec in (("RayCluster", "RayClusterSpec"), ("RayJob", "RayJobSpec"),
                     ("RayService", "RayServiceSpec")):
    KUBERAY[f"ray.io.v1.{_kind}"] = _closed({
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": _kind},
        "metadata": _core("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
        "spec": {"$ref": f"#/$defs/ray.io.v1.{_spec}"},
    }, required=["apiVersion", "kind", "metadata", "spec"])

# kind -> the $defs entry a document of that kind is validated against
ROOTS = {**CORE_ROOTS, **{k: f"ray.io.v1.{k}" for k in ("RayCluster", "RayJob", "RayService")}}

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _strip(node: Any) -> Any:
    """Drop descriptions (annotation only) from every schema object; keep
    property *names* such as a field called ``description``."""
    if isinstance(node, list):
        return [_strip(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _strip(sub) for name, sub in value.items()}
        else:
            out[key] = _strip(value)
    return out


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and "#/$defs/" in ref:
            found.add(ref.split("#/$defs/", 1)[1])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite_refs(v) for k, v in node.items()}
        if isinstance(out.get("$ref"), str) and "#/$defs/" in out["$ref"]:
            out["$ref"] = "#/$defs/" + out["$ref"].split("#/$defs/", 1)[1]
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


def core_definitions() -> dict[str, Any]:
    import importlib.resources

    base = importlib.resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/{K8S_VERSION}-local-strict/_definitions.json")
    defs = json.loads(base.read_text())["$defs"]
    wanted: set[str] = set()
    todo = set(CORE_ROOTS.values())
    while todo:
        name = todo.pop()
        if name in wanted:
            continue
        wanted.add(name)
        found: set[str] = set()
        _refs(defs[name], found)
        todo |= found - wanted
    return {name: _rewrite_refs(_strip(defs[name])) for name in sorted(wanted)}


def build(core: dict[str, Any]) -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"Generated by infra/schemas/generate.py. Core Kubernetes {K8S_VERSION} strict schemas "
            f"from the PyPI package kubernetes-validate=={KUBERNETES_VALIDATE} (Apache-2.0), "
            "descriptions stripped. KubeRay ray.io/v1 schemas (RayCluster, RayJob, RayService): "
            "hand-written from KubeRay's documented CRD API reference (1.5-1.6), a closed subset, "
            "not the operator's own openAPIV3Schema (no package ships it)."),
        "x-roots": ROOTS,
        "$defs": {**core, **KUBERAY},
    }


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed file is stale")
    args = parser.parse_args()
    text = render(build(core_definitions()))
    if args.check:
        stale = not OUT.exists() or OUT.read_text() != text
        print(f"{OUT}: {'stale' if stale else 'up to date'}")
        return 1 if stale else 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
