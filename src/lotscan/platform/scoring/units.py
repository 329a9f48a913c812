"""Units: score decoded images in a pool of actors, each holding the model once.

Two ways to run the expensive part (``score.fanout``):

- ``off`` — :class:`ScoreImages`: an actor runs every work unit of its
  images (in passes capped at ``score.max_units_per_pass`` image-units) and
  finalizes them in place; only the heatmap and the scores leave the actor.
- fan-out — :func:`expand_chunks` turns each image into rows of (image,
  chunk of units); :class:`ComputePartials` actors compute each chunk's
  partial (the methods' associative partial sums); ``reduce.py`` adds the
  partials of each image and finalizes. Any split of the units gives the same
  heatmap (to float rounding), so an image's units may run on many actors.

``auto`` picks the chunk size from the number of images and actors
(:func:`units_per_chunk`): fan-out only when there are too few images to keep
every actor busy.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch

from lotscan.config import storage_config
from lotscan.models.scoring import Scorer
from lotscan.platform.bundles import open_bundle
from lotscan.platform.scoring.faults import ModelFault

PARTIAL_PREFIX = "partial."


def units_per_chunk(fanout: int | str, num_images: int, max_actors: int, num_units: int) -> int:
    """Units per chunk row: ``off`` -> all of them (one chunk per image); an
    integer -> that many; ``auto`` -> enough chunks for about two per actor
    when images alone cannot fill the pool, else ``off``."""
    if fanout is False or fanout == "off" or num_units <= 1:
        return num_units
    if fanout == "auto":
        if num_images >= 2 * max_actors or max_actors <= 1:
            return num_units
        chunks = min(num_units, math.ceil(2 * max_actors / max(1, num_images)))
        return math.ceil(num_units / chunks)
    return max(1, min(int(fanout), num_units))


def expand_chunks(batch: dict[str, np.ndarray], per_chunk: int, num_units: int) -> dict[str, np.ndarray]:
    """``map_batches`` function: each decoded image -> one row per chunk of its
    units (``chunk``, ``unit_start``, ``unit_stop``, ``num_chunks``). Failed
    decodes stay one row (nothing to compute)."""
    n = len(batch["uri"])
    take, starts, stops, chunks, totals = [], [], [], [], []
    n_chunks = math.ceil(num_units / per_chunk)
    for i in range(n):
        if batch["error"][i]:
            take.append(i)
            starts.append(0)
            stops.append(0)
            chunks.append(0)
            totals.append(1)
            continue
        for c in range(n_chunks):
            take.append(i)
            starts.append(c * per_chunk)
            stops.append(min(num_units, (c + 1) * per_chunk))
            chunks.append(c)
            totals.append(n_chunks)
    index = np.asarray(take, dtype=np.int64)
    out = {k: np.asarray(v)[index] for k, v in batch.items()}
    out.update(chunk=np.asarray(chunks, np.int64), unit_start=np.asarray(starts, np.int64),
               unit_stop=np.asarray(stops, np.int64), num_chunks=np.asarray(totals, np.int64))
    return out


def probe_image(size: int) -> np.ndarray:
    """A fixed, textured test image: a model that cannot score it is broken."""
    y, x = np.mgrid[0:size, 0:size]
    grey = (127 + 60 * np.sin(x / 3.0) * np.cos(y / 5.0)).astype(np.uint8)
    return np.repeat(grey[None, :, :, None], 3, axis=3)


class ScorerHost:
    """What every scoring actor holds: the bundle's method on its device, once."""

    def __init__(self, model_uri: str, overrides: dict[str, Any]):
        bundle = open_bundle(model_uri, storage_config(overrides), overrides=overrides)
        self.cfg = bundle.config
        if self.cfg.score.torch_threads > 0:
            torch.set_num_threads(self.cfg.score.torch_threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.scorer = Scorer(bundle.method, bundle.calibration, device)
        self.model_id = bundle.model_id
        self.model_uri = model_uri
        self.method = self.cfg.method
        self.actor_id = f"{os.uname().nodename}:{os.getpid()}"
        self._probe()

    def _probe(self) -> None:
        size = self.cfg.data.image_size
        try:
            result = self.scorer.score(probe_image(size), [0])
        except Exception as err:
            raise ModelFault(f"model {self.model_id} ({self.model_uri}) cannot score a probe "
                             f"image: {type(err).__name__}: {err}") from err
        if not np.all(np.isfinite(result.image_scores)):
            raise ModelFault(f"model {self.model_id} ({self.model_uri}) gives a non-finite score "
                             f"on a probe image: its weights or calibration are broken")
        # The shapes of one image's partial, so every output block has the same columns.
        from lotscan.models.scoring import to_model_input

        with torch.no_grad():
            partial = self.scorer.partial(to_model_input(probe_image(size), self.scorer.device),
                                          [0], [0])
        self.partial_template = {k: tuple(v.shape[1:]) for k, v in partial.items()}

    def check_finite(self, scores: np.ndarray, uris: np.ndarray) -> None:
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            raise ModelFault(f"model {self.model_id} gave a non-finite score for {uris[bad[0]]} "
                             f"({bad.size} of {len(scores)} images in its batch); the run stopped "
                             f"and recorded nothing for that batch")


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:500]


def score_or_bisect(call, items: list[int]) -> tuple[dict[int, Any], dict[int, str]]:
    """Run ``call(items)`` (a list of row indices -> list of outcomes); when it
    raises, split the rows in halves down to single images, so one image that
    makes the scorer fail fails alone. A :class:`ModelFault` is never split.
    Returns ({row: outcome}, {row: error}); raises ModelFault when every image of
    a batch of two or more fails on its own (the model, not the images)."""
    outcomes: dict[int, Any] = {}
    errors: dict[int, str] = {}

    def run(rows: list[int]) -> None:
        try:
            for row, out in zip(rows, call(rows), strict=True):
                outcomes[row] = out
        except ModelFault:
            raise
        except Exception as err:
            if len(rows) == 1:
                errors[rows[0]] = _describe(err)
                return
            half = len(rows) // 2
            run(rows[:half])
            run(rows[half:])

    run(items)
    if len(items) >= 2 and len(errors) == len(items):
        raise ModelFault(f"the scorer fails on every image of a batch ({next(iter(errors.values()))}): "
                         f"the model or the code is broken, not the images")
    return outcomes, errors


class ScoreImages(ScorerHost):
    """Actor (``fanout=off``): decoded images -> scores and heatmaps."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from lotscan.platform.scoring.finalize import result_columns

        ok = [i for i in range(len(batch["uri"])) if not batch["error"][i]]
        start = time.perf_counter()

        def call(rows: list[int]) -> list[Any]:
            result = self.scorer.score(batch["image"][rows], [int(batch["seed"][i]) for i in rows],
                                       categories=[str(batch["category"][i]) for i in rows])
            self.check_finite(result.image_scores, batch["uri"][rows])
            return [(result.anomaly_maps[j], result.image_scores[j], result.decisions[j],
                     result.thresholds[j]) for j in range(len(rows))]

        outcomes, errors = score_or_bisect(call, ok) if ok else ({}, {})
        per_image_ms = (time.perf_counter() - start) * 1000.0 / max(1, len(ok))
        return result_columns(batch, outcomes, errors, per_image_ms, self)


class ComputePartials(ScorerHost):
    """Actor (fan-out): chunk rows -> each chunk's partial, as ``partial.<key>``
    tensor columns (float32), plus the actor that computed it."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from lotscan.models.scoring import to_model_input

        n = len(batch["uri"])
        ok = [i for i in range(n) if not batch["error"][i]]
        errors = [str(e) for e in batch["error"]]
        kinds = [str(k) for k in batch["error_kind"]]
        start = time.perf_counter()
        parts: dict[int, dict[str, np.ndarray]] = {}
        # Rows with the same unit range are computed together.
        groups: dict[tuple[int, int], list[int]] = {}
        for i in ok:
            groups.setdefault((int(batch["unit_start"][i]), int(batch["unit_stop"][i])), []).append(i)
        for (lo, hi), rows in groups.items():
            def call(sub: list[int], lo=lo, hi=hi) -> list[dict[str, np.ndarray]]:
                x = to_model_input(batch["image"][sub], self.scorer.device)
                with torch.no_grad():
                    partial = self.scorer.partial(x, [int(batch["seed"][i]) for i in sub],
                                                  list(range(lo, hi)))
                host = {k: v.float().cpu().numpy() for k, v in partial.items()}
                for k, v in host.items():
                    if not np.all(np.isfinite(v)):
                        raise ModelFault(f"model {self.model_id} gave non-finite partial "
                                         f"{k!r} for {batch['uri'][sub[0]]}; the run stopped")
                return [{k: v[j] for k, v in host.items()} for j in range(len(sub))]

            outcomes, failed = score_or_bisect(call, rows)
            parts.update(outcomes)
            for i, reason in failed.items():
                errors[i] = f"{batch['uri'][i]}: the scorer failed on this image ({reason})"
                kinds[i] = "permanent"
        ms = (time.perf_counter() - start) * 1000.0 / max(1, len(ok))
        out = {k: v for k, v in batch.items() if k != "image"}
        for key, shape in sorted(self.partial_template.items()):
            column = np.zeros((n, *shape), np.float32)
            for i, p in parts.items():
                column[i] = p[key]
            out[PARTIAL_PREFIX + key] = column
        out["error"] = np.array(errors, dtype=object)
        out["error_kind"] = np.array(kinds, dtype=object)
        out["score_ms"] = np.full(n, ms)
        out["actor"] = np.array([self.actor_id] * n, dtype=object)
        return out
