"""Building the Serve application: a bundle URI and the ``serve`` config section
become the two bound deployments (``LotscanModel`` behind ``LotscanIngress``)."""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import serve

from lotscan.config import ConfigError, LotscanConfig, from_dict, load_config, storage_config
from lotscan.models.bundle import MANIFEST, BundleError, _check_overrides, read_manifest
from lotscan.platform.runtime import cluster_has_gpus
from lotscan.platform.serve.auth import resolve_token
from lotscan.platform.serve.ingress import LotscanIngress
from lotscan.platform.serve.model import LotscanModel
from lotscan.platform.serve.proxy import install_proxy_errors
from lotscan.platform.storage import StorageError, join, read_bytes

APP_NAME = "lotscan"
IMPORT_PATH = "lotscan.platform.serving:app_builder"

# JSON errors from Serve's HTTP proxy on a Ray this process starts later
# (``lotscan serve``, the tests, the benchmarks); see lotscan.platform.serve.proxy.
install_proxy_errors()


@dataclass
class ServeApp:
    """A built application and what ``lotscan serve`` prints about it."""

    app: serve.Application
    config: LotscanConfig
    manifest: dict[str, Any]
    auth: str
    num_gpus: float


def bundle_manifest(model_uri: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Read and check only ``bundle.json`` (no weights): fail fast in the driver
    on a missing bundle or an override the calibration forbids."""
    storage = storage_config(overrides)
    try:
        raw = read_bytes(join(model_uri, MANIFEST), storage)
    except StorageError as err:
        raise BundleError(f"{model_uri}: no readable model bundle here ({err})") from err
    manifest = read_manifest(raw, model_uri)
    _check_overrides(manifest["config"], overrides, model_uri)
    return manifest


def effective_config(manifest: dict[str, Any], overrides: dict[str, Any]) -> LotscanConfig:
    """The bundle's stored config with the scoring overrides on top, as the
    model replica will see it; ``storage`` and ``serve`` come from the
    overrides only (they belong to this deployment, not to the model)."""
    load_config(base=overrides)  # names a bad key or type in the overrides
    merged = json.loads(json.dumps(manifest["config"]))
    merged["storage"] = {}
    merged["serve"] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    try:
        return from_dict(merged).validate()
    except ConfigError as err:
        raise BundleError(f"bundle config with overrides is invalid: {err}") from err


def _scaling(autoscaling: bool, replicas: int, low: int, high: int,
             target: float) -> dict[str, Any]:
    if autoscaling:
        return {"autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                       "target_ongoing_requests": target}}
    return {"num_replicas": replicas}


def build(model_uri: str, overrides: dict[str, Any] | None = None,
          environ: Mapping[str, str] | None = None) -> ServeApp:
    """Bind the two deployments with the options of the ``serve`` config section."""
    overrides = json.loads(json.dumps(overrides or {}))
    manifest = bundle_manifest(model_uri, overrides)
    cfg = effective_config(manifest, overrides)
    s = cfg.serve
    token_sha256, auth = resolve_token(s, environ)
    gpus = s.num_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.is_initialized() and cluster_has_gpus() else 0.0
    backpressure = {"status_code": 503, "retry_after_s": float(s.retry_after_s)}
    model = LotscanModel.options(
        health_check_period_s=s.health_check_period_s,
        ray_actor_options={"num_cpus": s.num_cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        backpressure_config=backpressure,
        **_scaling(s.autoscaling, s.num_replicas, s.min_replicas, s.max_replicas,
                   s.target_ongoing_requests),
    ).bind(model_uri, overrides, vars(s), gpus > 0)
    ingress = LotscanIngress.options(
        health_check_period_s=s.health_check_period_s,
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
        max_ongoing_requests=s.ingress_max_ongoing_requests,
        # Last resort when the ingress itself is saturated: Serve's proxy answers
        # 503 + Retry-After (JSON through lotscan.platform.serve.proxy).
        max_queued_requests=s.ingress_max_ongoing_requests,
        backpressure_config=backpressure,
        **_scaling(s.ingress_autoscaling, s.ingress_replicas, s.ingress_min_replicas,
                   s.ingress_max_replicas, s.ingress_target_ongoing_requests),
    ).bind(model, cfg.to_dict(), token_sha256, str(manifest.get("model_id", "")))
    return ServeApp(ingress, cfg, manifest, auth, gpus)


def build_app(model_uri: str, overrides: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application for ``model_uri`` (see :func:`build`)."""
    return build(model_uri, overrides).app


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Import path for ``serve deploy`` (``lotscan.platform.serving:app_builder``).

    ``args``: ``model`` (bundle URI, required); ``config`` (path of a lotscan
    YAML file on the cluster, optional); ``overrides`` (the same nested
    mapping as that YAML, e.g. ``{serve: {max_batch_size: 16}}``), applied last.
    """
    if not isinstance(args, dict) or not args.get("model"):
        raise ConfigError("Serve application args need 'model': the bundle URI")
    unknown = set(args) - {"model", "config", "overrides"}
    if unknown:
        raise ConfigError(f"unknown Serve application args {sorted(unknown)}; "
                          f"known: model, config, overrides")
    data: dict[str, Any] = {}
    if args.get("config"):
        path = Path(str(args["config"]))
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        import yaml

        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        data.update(loaded)
    for key, value in (args.get("overrides") or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return build_app(str(args["model"]), data)


def _replicas(autoscaling: bool, fixed: int, low: int, high: int) -> str:
    return f"{low}-{high}" if autoscaling else str(fixed)


def start_app(model_uri: str, overrides: dict[str, Any] | None = None, name: str = APP_NAME,
              route_prefix: str = "/", log: Callable[[str], None] = print) -> str:
    """Deploy on the connected Ray (Serve's HTTP proxy on serve.host:serve.port
    if Serve is not running yet); returns the base URL once replicas are up."""
    built = build(model_uri, overrides)
    s = built.config.serve
    log(f"[lotscan serve] {built.config.method} model {built.manifest.get('model_id', '')} "
        f"from {model_uri}: {_replicas(s.autoscaling, s.num_replicas, s.min_replicas, s.max_replicas)} "
        f"model replica(s), {built.num_gpus:g} GPU each, batches of up to {s.max_batch_size} "
        f"(wait {s.batch_wait_timeout_s * 1000:g} ms); "
        f"{_replicas(s.ingress_autoscaling, s.ingress_replicas, s.ingress_min_replicas, s.ingress_max_replicas)} "
        f"ingress replica(s); auth {built.auth}")
    serve.start(http_options={"host": s.host, "port": s.port,
                              "request_timeout_s": s.proxy_request_timeout_s})
    serve.run(built.app, name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{s.host}:{s.port}{route_prefix.rstrip('/')}"
