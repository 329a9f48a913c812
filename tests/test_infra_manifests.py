"""The KubeRay manifests in infra/kuberay, checked offline (no cluster).

Two layers:
* schema: every document against infra/schemas/manifests.schema.json (core
  Kubernetes objects from kubernetes-validate's strict schemas, KubeRay's
  ray.io/v1 objects from a closed schema written from KubeRay's API reference;
  see infra/schemas/generate.py);
* security: Ray token auth on, no static storage keys, workload identity,
  buckets inside the allow-list and the IAM policy, head without CPUs,
  autoscaling workers, the NetworkPolicy, the Serve token mounted.
Each check is shown to fail on a manifest broken in the way it guards against.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

INFRA = Path(__file__).parents[1] / "infra"
KUBERAY = INFRA / "kuberay"
SCHEMA_FILE = INFRA / "schemas" / "manifests.schema.json"
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
RAY_LABEL = {"app.kubernetes.io/part-of": "lotscan-ray"}
HEAD_PORTS = {6379, 8265, 10001, 8000, 8080}
STATIC_KEY_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                  "AWS_SECURITY_TOKEN"}
ACCESS_KEY = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
WORKLOAD_IDENTITY = ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account")
S3_URI = re.compile(r"s3://([^/\s'\"]*)")


# ------------------------------------------------------------------- loading

def load_all() -> dict[str, list[dict[str, Any]]]:
    return {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            for path in sorted(KUBERAY.glob("*.yaml"))}


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_FILE.read_text())


@cache
def _validator(root: str) -> Draft202012Validator:
    schema = {**_schema(), "$ref": f"#/$defs/{root}"}
    return Draft202012Validator(schema)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    root = _schema()["x-roots"].get(doc.get("kind"))
    if root is None:
        return [f"no schema for kind {doc.get('kind')!r}"]
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in _validator(root).iter_errors(doc)]


# ------------------------------------------------------------------- walking

def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc.get("spec", {})
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec") or {},
            "RayService": spec.get("rayClusterConfig") or {}}[doc["kind"]]


def templates(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec.get("headGroupSpec", {}).get("template", {})
    for group in spec.get("workerGroupSpecs") or []:
        yield f"worker group {group.get('groupName')}", group.get("template", {})


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    pod = template.get("spec", {})
    return list(pod.get("containers") or []) + list(pod.get("initContainers") or [])


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def env_value(container: dict[str, Any], name: str) -> str | None:
    for entry in container.get("env") or []:
        if entry.get("name") == name:
            return entry.get("value")
    return None


def service_accounts(all_docs: dict[str, list[dict]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for docs in all_docs.values() for d in docs
            if d.get("kind") == "ServiceAccount"}


def iam_buckets(role: str) -> set[str] | None:
    path = INFRA / "iam" / f"{role}-policy.json"
    if not path.is_file():
        return None
    policy = json.loads(path.read_text())
    buckets = set()
    for statement in policy["Statement"]:
        resources = statement["Resource"]
        for arn in [resources] if isinstance(resources, str) else resources:
            assert arn.startswith("arn:aws:s3:::"), arn
            buckets.add(arn[len("arn:aws:s3:::"):].split("/", 1)[0])
    return buckets


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = selector.get("matchLabels") or {}
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


# ------------------------------------------------------------------- security checks

def ray_problems(doc: dict[str, Any], all_docs: dict[str, list[dict]]) -> list[str]:
    """What is wrong, security-wise, with one RayCluster / RayJob / RayService."""
    problems: list[str] = []
    spec = cluster_spec(doc)
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append("Ray token auth is off: spec authOptions.mode must be token")
    version = tuple(int(p) for p in re.findall(r"\d+", str(spec.get("rayVersion", "0")))[:2])
    if version < (2, 52):
        problems.append(f"rayVersion {spec.get('rayVersion')!r}: token auth needs Ray >= 2.52")
    if spec.get("headGroupSpec", {}).get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append("head rayStartParams num-cpus must be \"0\" (nothing scheduled on the head)")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true (autoscaling worker groups)")
    for group in spec.get("workerGroupSpecs") or []:
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        replicas = group.get("replicas", low)
        if not all(isinstance(n, int) for n in (low, high, replicas)):
            continue  # a schema error already
        if not (low < high and low <= replicas <= high):
            problems.append(f"worker group {group.get('groupName')}: no autoscaling range "
                            f"(need minReplicas < maxReplicas, replicas between them)")

    accounts = service_accounts(all_docs)
    policies = [d for docs in all_docs.values() for d in docs if d.get("kind") == "NetworkPolicy"]
    allowed_values: set[str | None] = set()
    roles: set[str] = set()
    for where, template in templates(spec):
        pod = template.get("spec", {})
        labels = (template.get("metadata") or {}).get("labels") or {}
        if not any(_selects(p["spec"].get("podSelector", {}), labels) for p in policies):
            problems.append(f"{where}: pods not selected by the NetworkPolicy (labels {labels})")
        account = accounts.get(pod.get("serviceAccountName", ""))
        annotations = ((account or {}).get("metadata") or {}).get("annotations") or {}
        identity = [annotations[k] for k in WORKLOAD_IDENTITY if k in annotations]
        if not identity:
            problems.append(f"{where}: no workload identity (serviceAccountName "
                            f"{pod.get('serviceAccountName')!r} has no IRSA / GKE WI annotation)")
        else:
            roles.update(i.rsplit("/", 1)[-1] for i in identity if i.startswith("arn:aws:iam::"))
        if where != "head" and pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken must be false")
        for container in containers(template):
            name = f"{where} container {container.get('name')}"
            for entry in container.get("env") or []:
                if entry.get("name") in STATIC_KEY_ENV:
                    problems.append(f"{name}: static storage credentials in env {entry['name']}")
            for source in container.get("envFrom") or []:
                if "secretRef" in source:
                    problems.append(f"{name}: envFrom loads a whole Secret "
                                    f"({source['secretRef'].get('name')}) into the environment")
            if container.get("name", "").startswith("ray-"):
                allowed_values.add(env_value(container, "LOTSCAN_ALLOWED_BUCKETS"))
    if any(text for text in strings(doc) if ACCESS_KEY.search(text)):
        problems.append("an AWS access key id is written in the manifest")

    if None in allowed_values:
        problems.append("a Ray container has no LOTSCAN_ALLOWED_BUCKETS")
    allowed_values.discard(None)
    if len(allowed_values) > 1:
        problems.append(f"Ray containers disagree on LOTSCAN_ALLOWED_BUCKETS: {sorted(allowed_values)}")
    allowed = {b.strip() for v in allowed_values for b in str(v).split(",") if b.strip()}
    for text in strings(doc):
        for bucket in S3_URI.findall(text):
            if bucket not in allowed:
                problems.append(f"bucket {bucket!r} is not in LOTSCAN_ALLOWED_BUCKETS "
                                f"({', '.join(sorted(allowed))})")
    for role in roles:
        granted = iam_buckets(role)
        if granted is None:
            problems.append(f"role {role}: no IAM policy infra/iam/{role}-policy.json")
        elif allowed != granted:
            problems.append(f"role {role}: LOTSCAN_ALLOWED_BUCKETS {sorted(allowed)} is not the IAM "
                            f"policy's buckets {sorted(granted)}")
    if doc["kind"] == "RayService":
        problems += serve_problems(doc, spec)
    return problems


def serve_problems(doc: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    problems = []
    config = yaml.safe_load(doc["spec"].get("serveConfigV2") or "") or {}
    for app in config.get("applications") or []:
        serve_cfg = ((app.get("args") or {}).get("overrides") or {}).get("serve") or {}
        if serve_cfg.get("require_auth") is not True:
            problems.append(f"Serve app {app.get('name')}: serve.require_auth must be true")
        token_file = serve_cfg.get("auth_token_file")
        if not token_file:
            problems.append(f"Serve app {app.get('name')}: no serve.auth_token_file")
            continue
        for where, template in templates(spec):
            pod = template.get("spec", {})
            secrets = {v["name"]: v["secret"] for v in pod.get("volumes") or [] if "secret" in v}
            mounted = False
            for container in pod.get("containers") or []:
                if not container.get("name", "").startswith("ray-"):
                    continue
                for mount in container.get("volumeMounts") or []:
                    secret = secrets.get(mount.get("name"))
                    if secret is None:
                        continue
                    paths = {mount["mountPath"].rstrip("/") + "/" + item["path"]
                             for item in secret.get("items") or []}
                    if token_file in paths and secret.get("secretName"):
                        mounted = True
            if not mounted:
                problems.append(f"{where}: the Serve token file {token_file} is not mounted "
                                f"from a Secret")
    return problems


def network_problems(all_docs: dict[str, list[dict]]) -> list[str]:
    policies = [d for docs in all_docs.values() for d in docs if d.get("kind") == "NetworkPolicy"
                and _selects(d["spec"].get("podSelector", {}), RAY_LABEL)]
    if not policies:
        return ["no NetworkPolicy selects the lotscan Ray pods"]
    problems = []
    for policy in policies:
        spec = policy["spec"]
        if "Ingress" not in (spec.get("policyTypes") or []):
            problems.append(f"{policy['metadata']['name']}: policyTypes must include Ingress")
        for number, rule in enumerate(spec.get("ingress") or []):
            sources = rule.get("from") or []
            ports = {p.get("port") for p in rule.get("ports") or []}
            if not sources:
                problems.append(f"ingress rule {number}: open from everywhere (no 'from')")
            for source in sources:
                if "ipBlock" in source:
                    problems.append(f"ingress rule {number}: ipBlock {source['ipBlock']} "
                                    f"(allow pods and namespaces by label only)")
                for key in ("podSelector", "namespaceSelector"):
                    if key in source and not (source[key] or {}).get("matchLabels"):
                        problems.append(f"ingress rule {number}: empty {key} "
                                        f"(matches every {'pod' if key == 'podSelector' else 'namespace'})")
            own_pods_only = sources and all(
                set(s) == {"podSelector"} and _selects(s["podSelector"], RAY_LABEL) for s in sources)
            if not ports and not own_pods_only:
                problems.append(f"ingress rule {number}: every port open to {sources}")
            if not own_pods_only:
                for port in sorted(ports & {6379, 10001}):
                    problems.append(f"ingress rule {number}: port {port} open to {sources}")
                for port in sorted(p for p in ports if p not in HEAD_PORTS):
                    problems.append(f"ingress rule {number}: unexpected port {port}")
    return problems


def all_problems(all_docs: dict[str, list[dict]]) -> list[str]:
    problems = network_problems(all_docs)
    for name, docs in all_docs.items():
        for doc in docs:
            problems += [f"{name}: schema: {e}" for e in schema_errors(doc)]
            if doc.get("kind") in RAY_KINDS:
                problems += [f"{name}: {p}" for p in ray_problems(doc, all_docs)]
    return problems


# ------------------------------------------------------------------- the shipped manifests

def test_shipped_manifests_pass_every_check():
    docs = load_all()
    kinds = sorted(d["kind"] for file_docs in docs.values() for d in file_docs)
    assert kinds == sorted(["CronJob", "NetworkPolicy", "RayCluster", "RayJob", "RayJob",
                            "RayService", "Role", "RoleBinding", "ServiceAccount",
                            "ServiceAccount", "ServiceAccount"])
    assert all_problems(docs) == []


def test_rayservice_serves_the_shipped_serve_config():
    (service,) = load_all()["rayservice.yaml"]
    shipped = yaml.safe_load((INFRA / "serve" / "serve-config.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == shipped


def test_rayjobs_run_the_same_cluster_as_the_raycluster():
    """The copies of the cluster spec differ only where they must."""
    docs = load_all()
    base = cluster_spec(docs["raycluster.yaml"][0])
    for name in ("nightly-score-rayjob.yaml", "train-rayjob.yaml"):
        spec = copy.deepcopy(cluster_spec(docs[name][0]))
        assert spec["headGroupSpec"]["template"]["spec"].pop("restartPolicy") == "Never"
        spec["workerGroupSpecs"][0]["replicas"] = base["workerGroupSpecs"][0]["replicas"]
        assert spec == base, name


def test_committed_schema_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("generate", INFRA / "schemas" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    committed = _schema()
    core = {k: v for k, v in committed["$defs"].items() if not k.startswith("ray.io.")}
    assert generate.render(generate.build(core)) == SCHEMA_FILE.read_text()
    assert set(generate.CORE_ROOTS.values()) <= set(core)


# ------------------------------------------------------------------- each check can fail

Mutation = Callable[[dict[str, list[dict]]], None]


def _ray(docs, name: str) -> dict:
    return cluster_spec(docs[name][0])


def _worker(docs, name: str) -> dict:
    return _ray(docs, name)["workerGroupSpecs"][0]


def _worker_container(docs, name: str) -> dict:
    return _worker(docs, name)["template"]["spec"]["containers"][0]


def _head_container(docs, name: str) -> dict:
    return _ray(docs, name)["headGroupSpec"]["template"]["spec"]["containers"][0]


def _serve_config(docs, edit: Callable[[dict], None]) -> None:
    spec = docs["rayservice.yaml"][0]["spec"]
    config = yaml.safe_load(spec["serveConfigV2"])
    edit(config)
    spec["serveConfigV2"] = yaml.safe_dump(config)


def _policy_rules(docs) -> list[dict]:
    return docs["networkpolicy.yaml"][0]["spec"]["ingress"]


MUTATIONS: list[tuple[str, Mutation, str]] = [
    ("auth removed", lambda d: _ray(d, "raycluster.yaml").pop("authOptions"),
     "Ray token auth is off"),
    ("auth disabled", lambda d: _ray(d, "nightly-score-rayjob.yaml")["authOptions"].update(
        mode="disabled"), "Ray token auth is off"),
    ("old ray", lambda d: _ray(d, "train-rayjob.yaml").update(rayVersion="2.46.0"),
     "token auth needs Ray >= 2.52"),
    ("static AWS key in env", lambda d: _worker_container(d, "rayservice.yaml")["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}),
     "static storage credentials in env AWS_SECRET_ACCESS_KEY"),
    ("static AWS key from a Secret", lambda d: _head_container(d, "train-rayjob.yaml")["env"].append(
        {"name": "AWS_ACCESS_KEY_ID",
         "valueFrom": {"secretKeyRef": {"name": "lotscan-s3", "key": "id"}}}),
     "static storage credentials in env AWS_ACCESS_KEY_ID"),
    ("whole Secret as env", lambda d: _worker_container(d, "train-rayjob.yaml").update(
        envFrom=[{"secretRef": {"name": "lotscan-s3"}}]), "envFrom loads a whole Secret"),
    ("access key id in a value", lambda d: _head_container(d, "raycluster.yaml")["env"].append(
        {"name": "SOMETHING", "value": "AKIAIOSFODNN7EXAMPLE"}), "AWS access key id is written"),
    ("bucket outside the allow-list", lambda d: d["nightly-score-rayjob.yaml"][0]["spec"].update(
        entrypoint="lotscan score --model s3://models/m --input s3://evil-bucket/lot/ "
                   "--out s3://scores/x"),
     "bucket 'evil-bucket' is not in LOTSCAN_ALLOWED_BUCKETS"),
    ("serve reads a bucket it may not", lambda d: _serve_config(
        d, lambda c: c["applications"][0]["args"].update(model="s3://lots/line3/dta")),
     "bucket 'lots' is not in LOTSCAN_ALLOWED_BUCKETS"),
    ("no allow-list on a worker", lambda d: _worker_container(d, "raycluster.yaml").update(
        env=[e for e in _worker_container(d, "raycluster.yaml")["env"]
             if e["name"] != "LOTSCAN_ALLOWED_BUCKETS"]), "has no LOTSCAN_ALLOWED_BUCKETS"),
    ("allow-list wider than IAM", lambda d: [
        e.update(value="lots,models,scores,extra")
        for c in (_head_container(d, "raycluster.yaml"), _worker_container(d, "raycluster.yaml"))
        for e in c["env"] if e["name"] == "LOTSCAN_ALLOWED_BUCKETS"],
     "is not the IAM policy's buckets"),
    ("CPUs on the head", lambda d: _ray(d, "raycluster.yaml")["headGroupSpec"]["rayStartParams"]
     .update({"num-cpus": "4"}), "num-cpus must be"),
    ("autoscaler off", lambda d: _ray(d, "rayservice.yaml").update(enableInTreeAutoscaling=False),
     "enableInTreeAutoscaling must be true"),
    ("fixed-size worker group", lambda d: _worker(d, "train-rayjob.yaml").update(
        minReplicas=2, maxReplicas=2), "no autoscaling range"),
    ("serve auth not required", lambda d: _serve_config(
        d, lambda c: c["applications"][0]["args"]["overrides"]["serve"].update(require_auth=False)),
     "serve.require_auth must be true"),
    ("serve token not mounted", lambda d: _worker(d, "rayservice.yaml")["template"]["spec"].update(
        volumes=[v for v in _worker(d, "rayservice.yaml")["template"]["spec"]["volumes"]
                 if "secret" not in v]), "is not mounted from a Secret"),
    ("worker mounts the API token", lambda d: _worker(d, "raycluster.yaml")["template"]["spec"]
     .pop("automountServiceAccountToken"), "automountServiceAccountToken must be false"),
    ("no service account", lambda d: _worker(d, "nightly-score-rayjob.yaml")["template"]["spec"]
     .pop("serviceAccountName"), "no workload identity"),
    ("service account without identity", lambda d: d["serviceaccounts.yaml"][0]["metadata"]
     .pop("annotations"), "no workload identity"),
    ("pods outside the NetworkPolicy", lambda d: _worker(d, "rayservice.yaml")["template"]
     ["metadata"]["labels"].pop("app.kubernetes.io/part-of"), "not selected by the NetworkPolicy"),
    ("NetworkPolicy removed", lambda d: d.pop("networkpolicy.yaml"), "no NetworkPolicy selects"),
    ("dashboard from everywhere", lambda d: _policy_rules(d).append(
        {"ports": [{"protocol": "TCP", "port": 8265}]}), "open from everywhere"),
    ("dashboard from every namespace", lambda d: _policy_rules(d).append(
        {"from": [{"namespaceSelector": {}}], "ports": [{"port": 8265}]}),
     "empty namespaceSelector"),
    ("GCS from a CIDR", lambda d: _policy_rules(d).append(
        {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"port": 6379}]}), "ipBlock"),
    ("GCS to serve clients", lambda d: _policy_rules(d)[2]["ports"].append({"port": 6379}),
     "port 6379 open to"),
    ("all ports to the operator namespace", lambda d: _policy_rules(d)[1].pop("ports"),
     "every port open to"),
    # schema: misspelt or mistyped fields are refused
    ("misspelt authOptions", lambda d: _ray(d, "raycluster.yaml").update(
        authOption=_ray(d, "raycluster.yaml").pop("authOptions")), "schema: spec: Additional properties"),
    ("replicas as text", lambda d: _worker(d, "raycluster.yaml").update(replicas="two"),
     "schema: spec/workerGroupSpecs/0/replicas"),
    ("unknown container field", lambda d: _head_container(d, "rayservice.yaml").update(imagee="x"),
     "schema: spec/rayClusterConfig/headGroupSpec/template/spec/containers/0"),
    ("unknown submission mode", lambda d: d["train-rayjob.yaml"][0]["spec"].update(
        submissionMode="ShellMode"), "schema: spec/submissionMode"),
    ("misspelt NetworkPolicy field", lambda d: d["networkpolicy.yaml"][0]["spec"].update(
        podSelectors={}), "schema: spec: Additional properties"),
    ("misspelt CronJob field", lambda d: d["nightly-score-cronjob.yaml"][3]["spec"].update(
        schedul="0 2 * * *"), "schema: spec: Additional properties"),
    ("wrong ServiceAccount apiVersion", lambda d: d["serviceaccounts.yaml"][1].update(
        apiVersion="v2"), "schema: apiVersion"),
]


@pytest.mark.parametrize("mutate, expected", [(m, e) for _, m, e in MUTATIONS],
                         ids=[name for name, _, _ in MUTATIONS])
def test_each_check_fails_on_a_broken_manifest(mutate, expected):
    docs = load_all()
    mutate(docs)
    problems = all_problems(docs)
    assert any(expected in p for p in problems), problems
