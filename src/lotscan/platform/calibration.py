"""Calibration on a Ray cluster: a pool of scoring actors, two passes, bounded memory.

The held-out normal images are split per category into range images and
threshold images (:func:`lotscan.models.calibration.split_halves`, by image
id). A pool of ``score.num_actors`` Ray actors (on GPUs when the cluster has
them, as for lot scoring) each builds the method once (the weights reach them
through the object store) and serves both passes; each call reads, decodes and
scores one batch of ``score.batch_size`` images, so an actor holds one batch
of signal maps at a time, and the pool keeps one call in flight per actor.

- Pass 1 (range images) returns, per image, a seeded sample of each signal's
  pixels: ``max_pixel_sample // images`` values, so the driver holds at most
  ``calibration.max_pixel_sample`` values per signal, whatever the set's size.
- Pass 2 (threshold images) returns, per image, its score under those ranges
  and a bounded pixel sample of its fused anomaly map (region threshold).

The driver never holds a signal map: about 16 MB per signal at the default
sample cap, where one serial task holding every map needed about 5 GB for
10k images at 256 px. Images that cannot be read are skipped and logged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import ray
import torch
from ray.util import ActorPool
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lotscan.config import LotscanConfig, from_dict
from lotscan.models.calibration import (
    Calibration,
    describe,
    finish_calibration,
    pixels_per_image,
    ranges_from_samples,
    split_halves,
)
from lotscan.models.registry import build_method
from lotscan.models.scoring import Scorer, calibration_pixels, calibration_scores
from lotscan.platform.decode import decode_one
from lotscan.platform.images import content_seed
from lotscan.platform.runtime import cluster_has_gpus

Log = Callable[[str], None]


class CalibrationWorker:
    """One scorer built from a config and network blobs (run as a Ray actor)."""

    def __init__(self, cfg: dict, networks: dict):
        self.cfg = from_dict(cfg)
        if self.cfg.score.torch_threads > 0:
            torch.set_num_threads(self.cfg.score.torch_threads)
        method = build_method(self.cfg)
        for name, blob in ray.get(networks["ref"]).items():
            method.networks[name].load_state_dict(load_safetensors(blob))
        self.scorer = Scorer(method, device="cuda" if torch.cuda.is_available() else "cpu")

    def _decode(self, rows: list[dict]) -> tuple[np.ndarray, list[int], list[str], list[str]]:
        images, seeds, categories, errors = [], [], [], []
        for row in rows:
            image, error = decode_one(row["uri"], self.cfg.storage, self.cfg.data)
            if error:
                errors.append(error)
                continue
            images.append(image)
            seeds.append(content_seed(image))
            categories.append(row["category"])
        return np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8), seeds, categories, errors

    def pixels(self, rows: list[dict], k: int) -> dict:
        """Pass 1 on one batch: {"signals": {name: (n, k)}, "errors": [...]}."""
        images, seeds, _, errors = self._decode(rows)
        signals = calibration_pixels(self.scorer, images, seeds, k) if seeds else {}
        return {"signals": signals, "errors": errors}

    def scores(self, rows: list[dict], ranges: dict[str, list[float]], k: int) -> dict:
        """Pass 2 on one batch: scores (n,), categories, region samples (n, k), errors."""
        images, seeds, categories, errors = self._decode(rows)
        if not seeds:
            return {"scores": np.zeros(0), "categories": [], "region": np.zeros((0, k), np.float32),
                    "errors": errors}
        scores, region = calibration_scores(self.scorer, images, seeds, ranges, k)
        return {"scores": scores, "categories": categories, "region": region, "errors": errors}


def _network_blobs(networks: dict[str, torch.nn.Module]) -> dict[str, bytes]:
    return {n: save_safetensors({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})
            for n, net in networks.items()}


def _actors(cfg: LotscanConfig, networks_ref) -> list:
    gpus = cfg.score.num_gpus_per_actor
    if gpus is None:
        gpus = 1 if cluster_has_gpus() else 0
    actor = ray.remote(CalibrationWorker).options(num_cpus=1 if not gpus else 0.5, num_gpus=gpus)
    return [actor.remote(cfg.to_dict(), {"ref": networks_ref}) for _ in range(cfg.score.num_actors)]


def _batches(rows: list[dict], size: int) -> list[list[dict]]:
    plain = [{"uri": r["uri"], "category": str(r.get("category") or "")} for r in rows]
    return [plain[i:i + size] for i in range(0, len(plain), size)]


def calibrate_networks(cfg: LotscanConfig, networks: dict[str, torch.nn.Module], rows: list[dict],
                       log: Log = print) -> Calibration:
    """Calibrate ``networks`` (the method of ``cfg``) on held-out normal ``rows``
    (``image_id``, ``uri``, ``category``) with an actor pool; see the module doc."""
    if not rows:
        raise ValueError("calibration needs at least one held-out normal image; none were given")
    ccfg = cfg.calibration
    keys = [str(r["image_id"]) for r in rows]
    categories = [str(r.get("category") or "") for r in rows]
    to_ranges = split_halves(keys, categories, ccfg.range_fraction)
    shared = not to_ranges.any()
    if shared:
        to_ranges[:] = True
    range_rows = [r for r, m in zip(rows, to_ranges, strict=True) if m]
    threshold_rows = rows if shared else [r for r, m in zip(rows, to_ranges, strict=True) if not m]
    log(f"[lotscan calibrate] {len(range_rows)} image(s) for the normalisation ranges, "
        f"{len(threshold_rows)} {'(the same) ' if shared else ''}for the thresholds")
    networks_ref = ray.put(_network_blobs(networks))
    actors = _actors(cfg, networks_ref)
    try:
        ranges, range_images, scores, cats, regions = _passes(
            cfg, ActorPool(actors), range_rows, threshold_rows, log)
    finally:
        for actor in actors:  # free their CPUs/GPUs now, not when collected
            ray.kill(actor)
    calibration = finish_calibration(ccfg, ranges, range_images, np.concatenate(scores), cats,
                                     regions, shared_images=shared)
    log(f"[lotscan calibrate] {describe(calibration)}")
    for warning in calibration.warnings:
        log(f"[lotscan calibrate] warning: {warning}")
    return calibration


def _passes(cfg: LotscanConfig, pool: ActorPool, range_rows: list[dict], threshold_rows: list[dict],
            log: Log):
    ccfg = cfg.calibration
    pixels = cfg.data.image_size ** 2
    names = build_method(cfg).signal_names
    size = cfg.score.batch_size

    def skipped(errors: list[str]) -> None:
        for error in errors:
            log(f"[lotscan calibrate] skipping unreadable image: {error}")

    k = pixels_per_image(len(range_rows), pixels, ccfg.max_pixel_sample)
    samples: dict[str, list[np.ndarray]] = {name: [] for name in names}
    range_images = 0
    for out in pool.map(lambda a, rows: a.pixels.remote(rows, k), _batches(range_rows, size)):
        skipped(out["errors"])
        for name, values in out["signals"].items():
            samples[name].append(values)
            range_images += len(values) if name == names[0] else 0
    if range_images == 0:
        raise ValueError("calibration: none of the range images could be read")
    ranges = ranges_from_samples(samples, ccfg)
    del samples

    k = pixels_per_image(len(threshold_rows), pixels, ccfg.max_pixel_sample)
    scores, cats, regions = [], [], []
    for out in pool.map(lambda a, rows: a.scores.remote(rows, ranges, k),
                        _batches(threshold_rows, size)):
        skipped(out["errors"])
        scores.append(out["scores"])
        cats += out["categories"]
        regions += list(out["region"])
    if not cats:
        raise ValueError("calibration: none of the threshold images could be read")
    return ranges, range_images, scores, cats, regions
