"""Metrics of a scored run that carries ground truth (``lotscan evaluate``).

Pixel metrics are computed at the ground-truth resolution: each heatmap is
upsampled (bilinear) to its mask's size, or for good images to the original
image size, so that thin defects are not lost by downsampling masks.

Every metric is reported per category, per category x defect type, and as
means (``docs/quality.md`` documents the ``metrics.json`` schema):

- a category's metrics use all its labelled images, as before;
- a defect type's metrics use that type's defective images plus **all good
  images of the same category**: image AUROC separates the type from the
  category's good images, the pixel metrics run over the type's images and
  the good images (whose pixels are all negatives). A mean over the types
  would hide one type at chance behind easy ones; this is what shows it.
- ``mean`` is the mean over categories of the category metrics (as before);
  ``defect_types`` the mean over the categories that have each type.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lotscan.config import DataConfig, StorageConfig
from lotscan.models.metrics import evaluate_all
from lotscan.platform.images import IMAGE_FORMATS, decode_mask
from lotscan.platform.scoring.outputs import read_heatmap, read_table
from lotscan.platform.storage import join, read_bytes, write_bytes

METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "au_pro")
Log = Callable[[str], None]


class EvaluationError(ValueError):
    pass


def _image_size(uri: str, storage: StorageConfig, data: DataConfig) -> tuple[int, int]:
    raw = read_bytes(uri, storage, max_bytes=data.max_image_bytes)
    with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as img:
        return img.size[1], img.size[0]


def _upsample(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if heatmap.shape == size:
        return heatmap.astype(np.float64)
    t = torch.from_numpy(heatmap.astype(np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].double().numpy()


UNTYPED = "(untyped)"
"""Defect-type key of a defective image whose row names no type (a manifest
without a ``defect_type`` value)."""

SCHEMA_VERSION = 2
"""``metrics.json`` version: 2 added ``defect_types`` (per category and means)."""


def _defect_type(label: int, defect_type: str) -> str:
    if label == 0:
        return "good"
    return defect_type if defect_type and defect_type != "good" else UNTYPED


def evaluate_groups(labels: np.ndarray, defect_types: list[str], scores: np.ndarray,
                    masks: list[np.ndarray], maps: list[np.ndarray],
                    fpr_limit: float = 0.3) -> dict[str, Any]:
    """Metrics of one category: over all its images and per defect type.

    ``labels`` are 0 (good) / 1 (defective), ``defect_types`` one name per image
    (ignored for good images), ``masks``/``maps`` per-image ground truth and
    anomaly maps of equal shape. Each defect type is evaluated on its own
    images plus every good image; undefined metrics (no good image, no defect
    pixel) are NaN. Returns the category's metrics, ``images``, ``defective``
    and ``defect_types: {name: {metrics..., images, defective}}`` (sorted).
    """
    labels = np.asarray(labels, dtype=int)
    scores = np.asarray(scores, dtype=np.float64)
    if not len(labels) == len(defect_types) == len(scores) == len(masks) == len(maps):
        raise ValueError("labels, defect_types, scores, masks and maps need one entry per image")
    kinds = [_defect_type(int(y), str(t)) for y, t in zip(labels, defect_types, strict=True)]
    good = [i for i, k in enumerate(kinds) if k == "good"]

    def metrics_of(index: list[int]) -> dict[str, float]:
        got = evaluate_all(labels[index], scores[index], [masks[i] for i in index],
                           [maps[i] for i in index], fpr_limit=fpr_limit)
        return {k: float(got[k]) for k in METRICS}

    per_type = {}
    for kind in sorted(set(kinds) - {"good"}):
        own = [i for i, k in enumerate(kinds) if k == kind]
        per_type[kind] = {**metrics_of(good + own), "images": len(good) + len(own),
                          "defective": len(own)}
    return {**metrics_of(list(range(len(labels)))), "images": int(len(labels)),
            "defective": int((labels == 1).sum()), "defect_types": per_type}


def evaluate_run(out_uri: str, storage: StorageConfig, fpr_limit: float = 0.3, log: Log = print,
                 data: DataConfig | None = None) -> dict[str, Any]:
    data = data or DataConfig()
    results = read_table(out_uri, "results", storage)
    if results.empty:
        raise EvaluationError(f"{out_uri}: no scored results to evaluate")
    labelled = results[results["label"].astype(int) >= 0]
    if labelled.empty:
        raise EvaluationError(
            f"{out_uri}: the scored images carry no ground truth (labels); score an MVTec-layout "
            "input or a manifest with a label column")
    failures = read_table(out_uri, "failures", storage)
    per_category: dict[str, dict[str, Any]] = {}
    for category, frame in labelled.groupby("category", sort=True):
        masks, maps = [], []
        for row in frame.itertuples():
            heatmap = read_heatmap(row.heatmap_uri, storage, float(row.heatmap_max))
            if row.mask_uri:
                raw = read_bytes(row.mask_uri, storage, max_bytes=data.max_image_bytes)
                mask = decode_mask(raw, None, row.mask_uri, data.max_image_pixels)
            else:
                if int(row.label) == 1:
                    log(f"[lotscan evaluate] warning: defective image without mask: {row.uri}")
                mask = np.zeros(_image_size(row.uri, storage, data), dtype=bool)
            masks.append(mask)
            maps.append(_upsample(heatmap, mask.shape))
        groups = evaluate_groups(frame["label"].astype(int).to_numpy(),
                                 [str(t) for t in frame["defect_type"].fillna("")],
                                 frame["score"].to_numpy(dtype=np.float64), masks, maps,
                                 fpr_limit=fpr_limit)
        per_category[str(category) or "(none)"] = {
            **{k: groups[k] for k in METRICS},
            "images": groups["images"], "defective": groups["defective"],
            # Unreadable images are not in the metrics: say how many there were.
            "failed": int((failures["category"].astype(str) == str(category)).sum()),
            "defect_types": groups["defect_types"],
        }
    mean = {k: _nanmean([m[k] for m in per_category.values()]) for k in METRICS}
    kinds = sorted({t for m in per_category.values() for t in m["defect_types"]})
    type_means = {}
    for kind in kinds:
        having = [m["defect_types"][kind] for m in per_category.values()
                  if kind in m["defect_types"]]
        type_means[kind] = {**{k: _nanmean([h[k] for h in having]) for k in METRICS},
                            "categories": len(having),
                            "defective": sum(h["defective"] for h in having)}
    report = {
        "schema_version": SCHEMA_VERSION,
        "out_uri": out_uri,
        "method": sorted(set(results["method"].astype(str))),
        "model_id": sorted(set(results["model_id"].astype(str))),
        "categories": per_category,
        "mean": mean,
        "defect_types": type_means,
        "fpr_limit": fpr_limit,
    }
    text = json.dumps(_nan_to_none(report), indent=2, allow_nan=False)
    write_bytes(join(out_uri, "metrics.json"), text.encode(), storage)
    return report


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def markdown_table(report: dict[str, Any]) -> str:
    """Two Markdown tables: per category and the mean (as before), then per
    category x defect type with the per-type means over categories."""
    def fmt(v: float) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    header = " | image AUROC | pixel AUROC | pixel AP | AU-PRO@0.3 |"
    lines = ["| category | images | failed" + header,
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cat, m in report["categories"].items():
        lines.append(f"| {cat} | {m['images']} | {m['failed']} | "
                     + " | ".join(fmt(m[k]) for k in METRICS) + " |")
    total = sum(m["images"] for m in report["categories"].values())
    failed = sum(m["failed"] for m in report["categories"].values())
    lines.append(f"| **mean** | {total} | {failed} | "
                 + " | ".join(fmt(report["mean"][k]) for k in METRICS) + " |")
    rows = [(cat, kind, t) for cat, m in report["categories"].items()
            for kind, t in m.get("defect_types", {}).items()]
    if not rows:
        return "\n".join(lines)
    lines += ["", "Per defect type (its images + the category's good images):", "",
              "| category | defect type | images | defective" + header,
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cat, kind, t in rows:
        lines.append(f"| {cat} | {kind} | {t['images']} | {t['defective']} | "
                     + " | ".join(fmt(t[k]) for k in METRICS) + " |")
    for kind, t in report.get("defect_types", {}).items():
        lines.append(f"| **mean** ({t['categories']} categories) | {kind} | | {t['defective']} | "
                     + " | ".join(fmt(t[k]) for k in METRICS) + " |")
    return "\n".join(lines)
