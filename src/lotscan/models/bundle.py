"""Model bundles: ``bundle.json`` plus one ``<network>.safetensors`` per network.

This module turns a trained method into named byte blobs and back; where the
blobs live (a local folder, an S3 prefix) is the platform's business. Weights
are read with safetensors only: a bundle from an untrusted bucket cannot run
code. Each network's diffusers/timm config is stored next to its weights, so
``UNet2DModel.from_config(...)`` plus the safetensors file also rebuild it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import lotscan
from lotscan.config import ConfigError, LotscanConfig, StorageConfig, from_dict
from lotscan.models.method import AnomalyMethod
from lotscan.models.registry import build_method
from lotscan.models.scoring import Calibration

BUNDLE_FORMAT = 1
MANIFEST = "bundle.json"

# What may differ at scoring time from the config a bundle was calibrated with.
# Everything else (method, networks, sweep, smoothing, pooling, calibration)
# changes what the stored ranges and threshold mean: use `lotscan calibrate`.
SCORING_OVERRIDES: dict[str, set[str] | None] = {
    "storage": None,  # any field: storage is where this deployment runs
    "train": None,  # ignored when scoring
    "score": {"batch_size", "max_units_per_pass", "num_actors", "min_actors", "num_gpus_per_actor", "num_cpus_per_actor",
              "max_tasks_in_flight_per_actor", "torch_threads", "fanout", "fanout_window_images",
              "reduce_actors", "decode_batch_size", "decode_num_cpus", "write_batch_size",
              "write_num_cpus", "lease_ttl_s", "lease_wait_s", "resume_broadcast_max_ids",
              "max_retryable_fraction", "heatmap_format", "heatmap_png_max", "report_top_k",
              "report_max_flagged"},
    "data": {"max_image_pixels", "max_image_bytes"},
    "serve": None,  # any field: how the endpoint runs, not what it computes
}


def _check_overrides(stored: dict[str, Any], overrides: dict[str, Any], where: str) -> None:
    for section, wanted in overrides.items():
        have = stored.get(section)
        if isinstance(wanted, dict) and isinstance(have, dict):
            allowed = SCORING_OVERRIDES.get(section, set())
            changed = [k for k, v in wanted.items() if have.get(k) != v
                       and allowed is not None and k not in allowed]
        else:
            changed = [] if wanted == have or SCORING_OVERRIDES.get(section, set()) is None else [""]
        if changed:
            keys = ", ".join(f"{section}.{k}" if k else section for k in changed)
            raise BundleError(
                f"{where}: {keys} cannot change at scoring time: the bundle's calibration was "
                f"measured with the stored value (use `lotscan calibrate` to make a bundle for it)"
            )


class BundleError(ValueError):
    """A bundle is missing, incomplete or does not match its manifest."""


@dataclass
class Bundle:
    method: AnomalyMethod
    calibration: Calibration | None
    training: dict[str, Any] = field(default_factory=dict)
    model_id: str = ""

    @property
    def config(self) -> LotscanConfig:
        return self.method.cfg


def _state_bytes(net) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return save_safetensors(state)


def bundle_files(bundle: Bundle) -> dict[str, bytes]:
    """All files of a bundle, manifest last in the dict (write it last, so a
    crashed write leaves no manifest pointing at missing weights)."""
    files: dict[str, bytes] = {}
    networks = {}
    digest = hashlib.sha256()
    for name, net in sorted(bundle.method.networks.items()):
        blob = _state_bytes(net)
        files[f"{name}.safetensors"] = blob
        digest.update(name.encode() + blob)
        net_config = dict(getattr(net, "config", {}) or {})
        networks[name] = {
            "file": f"{name}.safetensors",
            "class": f"{type(net).__module__}.{type(net).__qualname__}",
            "sha256": hashlib.sha256(blob).hexdigest(),
            "config": json.loads(json.dumps(net_config, default=str)),
        }
    cfg = bundle.method.cfg
    if bundle.calibration is not None:
        digest.update(json.dumps(bundle.calibration.to_dict(), sort_keys=True).encode())
    model_id = bundle.model_id or f"{cfg.method}-{digest.hexdigest()[:12]}"
    manifest = {
        "format": BUNDLE_FORMAT,
        "lotscan_version": lotscan.__version__,
        "method": cfg.method,
        "model_id": model_id,
        "image_size": cfg.data.image_size,
        # Storage is a property of a deployment, not of a model: never stored.
        "config": {**cfg.to_dict(), "storage": StorageConfig().__dict__},
        "calibration": bundle.calibration.to_dict() if bundle.calibration else None,
        "networks": networks,
        "training": bundle.training,
    }
    files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode()
    return files


def read_manifest(raw: bytes, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{where}: bundle.json is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{where}: unsupported bundle format {manifest.get('format') if isinstance(manifest, dict) else None!r}"
            f" (this lotscan reads format {BUNDLE_FORMAT})"
        )
    for key in ("method", "config", "networks"):
        if key not in manifest:
            raise BundleError(f"{where}: bundle.json has no {key!r}")
    return manifest


def load_bundle(
    read: Callable[[str], bytes],
    where: str,
    overrides: dict[str, Any] | None = None,
    require_calibration: bool = True,
) -> Bundle:
    """Rebuild a bundle from ``read(filename) -> bytes``. ``overrides`` (a nested
    dict) may change scoring settings, never the architecture or method."""
    manifest = read_manifest(read(MANIFEST), where)
    stored = manifest["config"]
    _check_overrides(stored, overrides or {}, where)
    merged = json.loads(json.dumps(stored))
    merged["storage"] = {}  # a bundle never decides where this job reads and writes
    for key, value in (overrides or {}).items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    try:
        cfg = from_dict(merged).validate()
    except ConfigError as err:
        raise BundleError(f"{where}: stored config is invalid: {err}") from err
    if cfg.method != manifest["method"]:
        raise BundleError(f"{where}: manifest method {manifest['method']!r} != config method {cfg.method!r}")
    method = build_method(cfg)
    expected = set(method.networks)
    present = set(manifest["networks"])
    if expected != present:
        raise BundleError(f"{where}: method {cfg.method} needs networks {sorted(expected)}, bundle has {sorted(present)}")
    for name, net in method.networks.items():
        entry = manifest["networks"][name]
        if entry.get("file") != f"{name}.safetensors":
            raise BundleError(f"{where}: network {name} must be stored as {name}.safetensors")
        blob = read(entry["file"])
        if entry.get("sha256") and hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise BundleError(f"{where}: {entry['file']} does not match the checksum in bundle.json")
        try:
            state = load_safetensors(blob)
        except Exception as err:
            raise BundleError(f"{where}: {entry['file']} is not a valid safetensors file ({err})") from err
        try:
            result = net.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise BundleError(f"{where}: {entry['file']} does not fit the {name} network ({err})") from err
        if result.missing_keys or result.unexpected_keys:
            raise BundleError(
                f"{where}: {entry['file']} does not fit the {name} network "
                f"(missing {list(result.missing_keys)[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
            )
    calibration = manifest.get("calibration")
    if calibration is None and require_calibration:
        raise BundleError(f"{where}: bundle is not calibrated (training did not finish its calibration pass)")
    return Bundle(
        method=method,
        calibration=Calibration.from_dict(calibration) if calibration else None,
        training=manifest.get("training", {}),
        model_id=manifest.get("model_id", ""),
    )
