"""Model bundles: ``bundle.json`` plus one ``<network>.safetensors`` per network.

This module turns a trained method into named byte blobs and back; where the
blobs live (a local folder, an S3 prefix) is the platform's business. Weights
are read with safetensors only: a bundle from an untrusted bucket cannot run
code. Each network's diffusers/timm config is stored next to its weights, so
``UNet2DModel.from_config(...)`` plus the safetensors file also rebuild it.

Loading trusts nothing in the bundle. Every weights file must carry its SHA-256
in ``bundle.json``; the model id is a hash of the content (see
:func:`content_model_id`) and is recomputed and compared at every load, so a
changed bundle is a different model or is refused; weights, threshold and
calibration ranges must be finite; the manifest is size-bounded strict JSON.
The model id is an integrity and identity check, not a signature: whoever may
write the bucket may also write a consistent bundle, so write access to the
models bucket is the trust boundary (docs/security.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import lotscan
from lotscan.config import ConfigError, LotscanConfig, StorageConfig, from_dict
from lotscan.models.method import AnomalyMethod
from lotscan.models.registry import METHODS, build_method
from lotscan.models.scoring import Calibration

BUNDLE_FORMAT = 2
"""Format 2: checksums required, content-derived model id (format 1 had neither)."""
MANIFEST = "bundle.json"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""Largest ``bundle.json`` read. A real one is a few tens of KiB (config,
calibration, network configs); 4 MiB leaves room and bounds what a hostile
bucket can make a loader parse."""
MAX_WEIGHTS_BYTES = 16 * 1024**3
"""Largest single ``.safetensors`` file read (16 GiB: far above a paper-scale
U-Net of ~100 M float32 parameters, 0.4 GB). Bounds memory, not trust."""
_NETWORK_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")

# What may differ at scoring time from the config a bundle was calibrated with.
# Everything else (method, networks, sweep, smoothing, pooling, calibration)
# changes what the stored ranges and threshold mean: use `lotscan calibrate`.
SCORING_OVERRIDES: dict[str, set[str] | None] = {
    "storage": None,  # any field: storage is where this deployment runs
    "train": None,  # ignored when scoring
    "score": {"batch_size", "max_units_per_pass", "num_actors", "min_actors", "num_gpus_per_actor", "num_cpus_per_actor",
              "max_tasks_in_flight_per_actor", "actor_start_timeout_s", "torch_threads", "fanout", "fanout_window_images",
              "reduce_actors", "decode_batch_size", "decode_num_cpus", "write_batch_size",
              "write_num_cpus", "lease_ttl_s", "lease_wait_s", "resume_broadcast_max_ids",
              "max_retryable_fraction", "heatmap_format", "heatmap_png_max", "report_top_k",
              "report_max_flagged", "region_min_area", "precision", "channels_last"},
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
    """A bundle is missing, incomplete, tampered with or does not match its manifest."""


@dataclass
class Bundle:
    method: AnomalyMethod
    calibration: Calibration | None
    training: dict[str, Any] = field(default_factory=dict)
    model_id: str = ""
    """Set by :func:`load_bundle` (the verified content id). Ignored by
    :func:`bundle_files`, which always derives the id from the content."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The verified ``bundle.json`` this bundle was loaded from (empty for a new
    bundle): read it here rather than reading the file again."""

    @property
    def config(self) -> LotscanConfig:
        return self.method.cfg


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def content_model_id(manifest: dict[str, Any]) -> str:
    """``<method>-<16 hex>``: SHA-256 over the format, the method, the stored
    config (less ``storage``, which a bundle never decides), the calibration and
    every network's weights digest. Not covered (metadata, no effect on
    scores): ``training``, ``lotscan_version`` and the networks' informational
    ``class``/``config`` entries. Same weights + config + calibration, same id;
    any other change, another id."""
    config = {k: v for k, v in manifest["config"].items() if k != "storage"}
    content = {
        "format": manifest["format"],
        "method": manifest["method"],
        "config": config,
        "calibration": manifest.get("calibration"),
        "networks": {name: entry["sha256"] for name, entry in manifest["networks"].items()},
    }
    return f"{manifest['method']}-{hashlib.sha256(_canonical(content)).hexdigest()[:16]}"


def _state_bytes(name: str, net) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    bad = [k for k, v in state.items() if _not_finite(v)]
    if bad:
        raise BundleError(f"refusing to write network {name}: non-finite weights in {bad[:3]}")
    return save_safetensors(state)


def _not_finite(tensor: torch.Tensor) -> bool:
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return False
    if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or tensor.is_complex():
        return not bool(torch.isfinite(tensor).all())
    return not bool(torch.isfinite(tensor.float()).all())  # float8 and friends


def bundle_files(bundle: Bundle) -> dict[str, bytes]:
    """All files of a bundle, manifest last in the dict (write it last, so a
    crashed write leaves no manifest pointing at missing weights). The model id
    is always the content id; ``bundle.model_id`` is not used."""
    files: dict[str, bytes] = {}
    networks = {}
    for name, net in sorted(bundle.method.networks.items()):
        blob = _state_bytes(name, net)
        files[f"{name}.safetensors"] = blob
        net_config = dict(getattr(net, "config", {}) or {})
        networks[name] = {
            "file": f"{name}.safetensors",
            "class": f"{type(net).__module__}.{type(net).__qualname__}",
            "sha256": hashlib.sha256(blob).hexdigest(),
            "config": json.loads(json.dumps(net_config, default=str)),
        }
    cfg = bundle.method.cfg
    if bundle.calibration is not None:
        _check_calibration(bundle.calibration.to_dict(), bundle.method.signal_names,
                           "new bundle")
    manifest = {
        "format": BUNDLE_FORMAT,
        "lotscan_version": lotscan.__version__,
        "method": cfg.method,
        "image_size": cfg.data.image_size,
        # Storage is a property of a deployment, not of a model: never stored.
        "config": {**cfg.to_dict(), "storage": StorageConfig().__dict__},
        "calibration": bundle.calibration.to_dict() if bundle.calibration else None,
        "networks": networks,
        "training": bundle.training,
    }
    try:
        manifest = json.loads(_canonical(manifest))  # the form a reader will see
    except ValueError as err:
        raise BundleError(f"refusing to write a bundle with non-JSON or non-finite values ({err})") from err
    manifest["model_id"] = content_model_id(manifest)
    files[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False).encode()
    return files


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _parse_json(raw: bytes) -> Any:
    """JSON with no NaN/Infinity, no numbers that overflow to inf, no duplicate keys."""
    return json.loads(raw, object_pairs_hook=_strict_object, parse_float=_finite_float,
                      parse_constant=_reject_constant)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_calibration(data: Any, signal_names: tuple[str, ...], where: str) -> Calibration:
    """Refuse calibration values that would make scores meaningless. Every
    method's signals are non-negative (errors, Fourier magnitudes, mask
    probabilities), and so are image scores: ranges need ``0 <= low <= high``,
    the threshold ``>= 0``, all finite."""
    def bad(what: str) -> BundleError:
        return BundleError(f"{where}: {MANIFEST}: calibration {what}")

    if not isinstance(data, dict):
        raise bad("must be a mapping")
    try:
        calibration = Calibration.from_dict(data)
    except (TypeError, ValueError) as err:  # from_dict names the field and what is wrong
        raise bad(f"has unknown or missing fields or invalid values ({err})") from err
    ranges = calibration.signal_ranges
    if not isinstance(ranges, dict) or set(ranges) != set(signal_names):
        got = sorted(ranges) if isinstance(ranges, dict) else ranges
        raise bad(f"signal_ranges must have exactly the signals {sorted(signal_names)}, got {got!r}")
    for name, pair in ranges.items():
        if (not isinstance(pair, list) or len(pair) != 2 or not all(_number(v) for v in pair)
                or not 0 <= pair[0] <= pair[1]):
            raise bad(f"signal_ranges[{name!r}] must be two finite numbers 0 <= low <= high, "
                      f"got {pair!r}")
    if not _number(calibration.threshold) or calibration.threshold < 0:
        raise bad(f"threshold must be a finite number >= 0, got {calibration.threshold!r}")
    if not _number(calibration.normal_fpr) or not 0 < calibration.normal_fpr < 1:
        raise bad(f"normal_fpr must be in (0, 1), got {calibration.normal_fpr!r}")
    if (not isinstance(calibration.num_images, int) or isinstance(calibration.num_images, bool)
            or calibration.num_images < 1):
        raise bad(f"num_images must be an integer >= 1, got {calibration.num_images!r}")
    stats = calibration.normal_score_stats
    if not isinstance(stats, dict) or not all(_number(v) for v in stats.values()):
        raise bad(f"normal_score_stats must map names to finite numbers, got {stats!r}")
    return calibration


def read_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and verify ``bundle.json`` (no weights are read): size, strict
    JSON, format, structure, checksums present, calibration sane, and the
    stored model id equal to :func:`content_model_id` of the content."""
    def bad(what: str) -> BundleError:
        return BundleError(f"{where}: {MANIFEST}: {what}")

    if len(raw) > MAX_MANIFEST_BYTES:
        raise bad(f"{len(raw)} bytes is over the limit of {MAX_MANIFEST_BYTES}")
    try:
        manifest = _parse_json(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise BundleError(f"{where}: {MANIFEST} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise bad("top level must be a JSON object")
    if manifest.get("format") != BUNDLE_FORMAT:
        hint = (" (written by an older lotscan, without required checksums or a content id: "
                "train or calibrate it again with this version)" if manifest.get("format") == 1 else "")
        raise bad(f"unsupported bundle format {manifest.get('format')!r}; this lotscan reads "
                  f"format {BUNDLE_FORMAT}{hint}")
    for key in ("method", "config", "networks", "model_id"):
        if key not in manifest:
            raise bad(f"has no {key!r}")
    method = manifest["method"]
    if not isinstance(method, str) or method not in METHODS:
        raise bad(f"unknown method {method!r} (known: {', '.join(sorted(METHODS))})")
    if not isinstance(manifest["config"], dict):
        raise bad("'config' must be a mapping")
    if not isinstance(manifest.get("training", {}), dict):
        raise bad("'training' must be a mapping")
    networks = manifest["networks"]
    if not isinstance(networks, dict) or not networks:
        raise bad("'networks' must be a non-empty mapping")
    for name, entry in networks.items():
        if not _NETWORK_NAME.fullmatch(name):
            raise bad(f"network name {name!r} is not a plain name (lowercase letters, digits, _)")
        if not isinstance(entry, dict):
            raise bad(f"network {name}: entry must be a mapping")
        if entry.get("file") != f"{name}.safetensors":
            raise bad(f"network {name}: must be stored as {name}.safetensors, "
                      f"not {entry.get('file')!r}")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise bad(f"network {name}: {name}.safetensors has no valid sha256 checksum "
                      f"(required: 64 lowercase hex digits)")
    if manifest.get("calibration") is not None:
        _check_calibration(manifest["calibration"], METHODS[method].signal_names_for(manifest["config"]),
                           where)
    stored = manifest["model_id"]
    actual = content_model_id(manifest)
    if stored != actual:
        raise bad(f"model id {stored!r} does not match the content ({actual}): the manifest "
                  f"was edited or corrupted after it was written")
    return manifest


def load_bundle(
    read: Callable[[str], bytes],
    where: str,
    overrides: dict[str, Any] | None = None,
    require_calibration: bool = True,
) -> Bundle:
    """Rebuild a bundle from ``read(filename) -> bytes``. ``overrides`` (a nested
    dict) may change scoring settings, never the architecture or method.

    Nothing is executed or unpickled: the manifest is verified first
    (:func:`read_manifest`), then each weights file against its checksum,
    parsed as safetensors and checked for non-finite values before it is
    copied into a network built from the verified config. ``read`` should
    bound what it reads (:data:`MAX_MANIFEST_BYTES`, :data:`MAX_WEIGHTS_BYTES`);
    sizes are checked here as well."""
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
        raise BundleError(f"{where}: {MANIFEST}: stored config is invalid: {err}") from err
    if cfg.method != manifest["method"]:
        raise BundleError(f"{where}: {MANIFEST}: manifest method {manifest['method']!r} != "
                          f"config method {cfg.method!r}")
    calibration = manifest.get("calibration")
    if calibration is None and require_calibration:
        raise BundleError(f"{where}: bundle is not calibrated (training did not finish its calibration pass)")
    method = build_method(cfg)
    expected = set(method.networks)
    present = set(manifest["networks"])
    if expected != present:
        raise BundleError(f"{where}: {MANIFEST}: method {cfg.method} needs networks "
                          f"{sorted(expected)}, bundle has {sorted(present)}")
    for name, net in method.networks.items():
        entry = manifest["networks"][name]
        file = entry["file"]
        blob = read(file)
        if len(blob) > MAX_WEIGHTS_BYTES:
            raise BundleError(f"{where}: {file}: {len(blob)} bytes is over the limit of {MAX_WEIGHTS_BYTES}")
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise BundleError(f"{where}: {file} does not match the checksum in {MANIFEST}")
        try:
            state = load_safetensors(blob)
        except Exception as err:  # safetensors raises its own error types; never unpickles
            raise BundleError(f"{where}: {file} is not a valid safetensors file ({err})") from err
        bad = [k for k, v in state.items() if _not_finite(v)]
        if bad:
            raise BundleError(f"{where}: {file}: non-finite weights (NaN or inf) in {bad[:3]}")
        try:
            result = net.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise BundleError(f"{where}: {file} does not fit the {name} network ({err})") from err
        if result.missing_keys or result.unexpected_keys:
            raise BundleError(
                f"{where}: {file} does not fit the {name} network "
                f"(missing {list(result.missing_keys)[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
            )
    return Bundle(
        method=method,
        calibration=Calibration.from_dict(calibration) if calibration else None,
        training=manifest.get("training", {}),
        model_id=manifest["model_id"],
        manifest=manifest,
    )
