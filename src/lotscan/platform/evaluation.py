"""Metrics of a scored run that carries ground truth (``lotscan evaluate``).

Pixel metrics are computed at the ground-truth resolution: each heatmap is
upsampled (bilinear) to its mask's size, or for good images to the original
image size, so that thin defects are not lost by downsampling masks.
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
        labels = frame["label"].astype(int).to_numpy()
        metrics = evaluate_all(labels, frame["score"].to_numpy(dtype=np.float64), masks, maps,
                               fpr_limit=fpr_limit)
        per_category[str(category) or "(none)"] = {
            **{k: float(metrics[k]) for k in METRICS},
            "images": int(len(frame)), "defective": int((labels == 1).sum()),
            # Unreadable images are not in the metrics: say how many there were.
            "failed": int((failures["category"].astype(str) == str(category)).sum()),
        }
    mean = {k: _nanmean([m[k] for m in per_category.values()]) for k in METRICS}
    report = {
        "out_uri": out_uri,
        "method": sorted(set(results["method"].astype(str))),
        "model_id": sorted(set(results["model_id"].astype(str))),
        "categories": per_category,
        "mean": mean,
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
    def fmt(v: float) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"

    lines = ["| category | images | failed | image AUROC | pixel AUROC | pixel AP | AU-PRO@0.3 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cat, m in report["categories"].items():
        lines.append(f"| {cat} | {m['images']} | {m['failed']} | "
                     + " | ".join(fmt(m[k]) for k in METRICS) + " |")
    total = sum(m["images"] for m in report["categories"].values())
    failed = sum(m["failed"] for m in report["categories"].values())
    lines.append(f"| **mean** | {total} | {failed} | "
                 + " | ".join(fmt(report["mean"][k]) for k in METRICS) + " |")
    return "\n".join(lines)
