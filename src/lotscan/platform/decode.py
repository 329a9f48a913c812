"""The CPU decode stage: storage bytes -> checked, resized uint8 images.

One function serves the Ray Data pipelines (training and scoring) and the
calibration pass. A bad file never raises here: its row gets a zero image and
an ``error`` naming the problem, so the job goes on and the failure is
recorded (DESIGN.md, step 3). ``error_kind`` tells a bad file
(``permanent``: corrupt, unsupported, too large, missing) from storage that
kept failing after its retries (``transient``: the image is tried again by the
next run, never recorded as its final result).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from lotscan.config import DataConfig, StorageConfig
from lotscan.platform.images import ImageDecodeError, content_seed, decode_image
from lotscan.platform.storage import StorageError, is_transient, read_bytes

PERMANENT = "permanent"
TRANSIENT = "transient"


def decode_checked(uri: str, storage: StorageConfig, data: DataConfig) -> tuple[np.ndarray, str, str]:
    """(image, error, error_kind): image is (S, S, 3) uint8; error and kind are
    "" on success, else kind is ``permanent`` or ``transient``."""
    size = data.image_size
    try:
        raw = read_bytes(uri, storage, max_bytes=data.max_image_bytes)
        return decode_image(raw, size, uri, data.max_image_pixels), "", ""
    except ImageDecodeError as err:
        return np.zeros((size, size, 3), dtype=np.uint8), str(err), PERMANENT
    except StorageError as err:
        kind = TRANSIENT if err.transient else PERMANENT
        return np.zeros((size, size, 3), dtype=np.uint8), str(err), kind
    except Exception as err:  # never let one file stop a lot
        kind = TRANSIENT if is_transient(err) else PERMANENT
        return (np.zeros((size, size, 3), dtype=np.uint8), f"{uri}: {type(err).__name__}: {err}",
                kind)


def decode_one(uri: str, storage: StorageConfig, data: DataConfig) -> tuple[np.ndarray, str]:
    """(image, error): image is (S, S, 3) uint8, error "" on success."""
    image, error, _ = decode_checked(uri, storage, data)
    return image, error


class DecodeBatch:
    """``dict[str, ndarray] -> dict[str, ndarray]`` for ``map_batches``: adds
    ``image`` (N, S, S, 3) uint8, ``seed`` (content hash, int64), ``error``,
    ``error_kind`` and ``decode_ms``; passes every other column through."""

    def __init__(self, storage: StorageConfig, data: DataConfig):
        self.storage = storage
        self.data = data

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, errors, kinds, seeds, millis = [], [], [], [], []
        for uri in batch["uri"]:
            start = time.perf_counter()
            image, error, kind = decode_checked(str(uri), self.storage, self.data)
            images.append(image)
            errors.append(error)
            kinds.append(kind)
            seeds.append(content_seed(image) if not error else 0)
            millis.append((time.perf_counter() - start) * 1000.0)
        out = dict(batch)
        out["image"] = np.stack(images) if images else np.zeros(
            (0, self.data.image_size, self.data.image_size, 3), np.uint8)
        out["error"] = np.array(errors, dtype=object)
        out["error_kind"] = np.array(kinds, dtype=object)
        out["seed"] = np.array(seeds, dtype=np.int64)
        out["decode_ms"] = np.array(millis, dtype=np.float64)
        return out
