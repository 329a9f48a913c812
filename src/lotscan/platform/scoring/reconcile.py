"""Reconcile: make every image have exactly one row again after a crash.

Two crash windows leave an image with two rows, and this step (run at the
start of every run, under the lease) removes the stale one:

- a retryable failure whose image has since got its final row (the run died
  between writing the row and deleting the retryable file): the retryable file
  goes;
- a permanent failure of an image re-scored by ``--retry-failed`` that has a
  result or a newer failure (the run died before dropping the old row): the
  old row goes (its part file is rewritten without it).

Failure rows are few, so their ids are read here; whether they have results
is asked of the results by a Ray task against the broadcast done ids.
"""

from __future__ import annotations

import io
import posixpath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import ray

from lotscan.config import StorageConfig
from lotscan.platform import storage as st
from lotscan.platform.scoring.outputs import (
    FAILURE_COLUMNS,
    failures_dir,
    retryable_dir,
    write_table,
)
from lotscan.platform.scoring.resume import ID_DTYPE


def _member(refs: list[Any], ids: list[str]) -> list[str]:
    parts = [np.asarray(a) for a in ray.get(refs)] if refs else []
    if not parts or not ids:
        return []
    done = np.sort(np.concatenate(parts))
    query = np.asarray(ids, dtype=object).astype(ID_DTYPE)
    pos = np.clip(np.searchsorted(done, query), 0, done.size - 1)
    return [i for i, hit in zip(ids, done[pos] == query, strict=True) if hit]


def members(refs: list[Any], ids: list[str]) -> set[str]:
    """Which of ``ids`` are in the broadcast id arrays (asked of a Ray task)."""
    if not refs or not ids:
        return set()
    return set(ray.get(ray.remote(_member).options(num_cpus=0.25).remote(refs, ids)))


def reconcile(out_uri: str, storage: StorageConfig, result_refs: list[Any]) -> dict[str, int]:
    """Remove stale failure rows (see the module docstring); returns what was removed."""
    removed = {"retryable": 0, "permanent": 0}
    retry_files = st.list_files(retryable_dir(out_uri), storage, suffixes=(".parquet",),
                                recursive=False)
    part_files = st.list_files(failures_dir(out_uri), storage, suffixes=(".parquet",),
                               recursive=False)
    frames = {}
    for uri in part_files:
        frames[uri] = pq.read_table(io.BytesIO(st.read_bytes(uri, storage))).to_pandas()
    permanent_ids = {i for f in frames.values() for i in f["image_id"]}
    retry_ids = {posixpath.basename(u)[: -len(".parquet")]: u for u in retry_files}
    candidates = sorted(set(retry_ids) | permanent_ids)
    with_results = members(result_refs, candidates)
    for image_id, uri in retry_ids.items():
        if image_id in with_results or image_id in permanent_ids:
            st.remove(uri, storage)
            removed["retryable"] += 1
    # A permanent failure superseded by a result, or by a newer failure of the same image.
    if frames:
        stamps = pd.concat([f.assign(_file=u) for u, f in frames.items()], ignore_index=True)
        newest = stamps.sort_values("failed_at", kind="stable").drop_duplicates("image_id", keep="last")
        keep_at = dict(zip(newest["image_id"], newest["_file"], strict=True))
        for uri, frame in frames.items():
            stale = frame["image_id"].isin(with_results) | \
                frame["image_id"].map(lambda i, uri=uri: keep_at.get(i) != uri)
            if not stale.any():
                continue
            removed["permanent"] += int(stale.sum())
            rest = frame[~stale]
            if len(rest):
                columns = FAILURE_COLUMNS + [c for c in rest.columns if c not in FAILURE_COLUMNS]
                write_table(rest, columns, uri, storage)
            else:
                st.remove(uri, storage)
    return removed
