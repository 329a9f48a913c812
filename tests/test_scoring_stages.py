"""The scoring pipeline's stages one at a time, without Ray: fan-out planning,
chunk rows, one bad image in a batch, the output lease, summaries."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
import pytest

from lotscan.config import StorageConfig
from lotscan.platform.scoring.faults import ModelFault
from lotscan.platform.scoring.lease import LeaseError, OutputLease
from lotscan.platform.scoring.summary import Stats, quantile_from_hist, summarize
from lotscan.platform.scoring.units import expand_chunks, score_or_bisect, units_per_chunk


@pytest.mark.parametrize("fanout,images,actors,units,expected", [
    ("off", 1, 8, 10, 10),
    (False, 1, 8, 10, 10),
    ("auto", 100, 4, 10, 10),    # enough images to fill the pool: no fan-out
    ("auto", 4, 2, 40, 40),      # 4 images >= 2 per actor: no fan-out
    ("auto", 1, 4, 10, 2),       # one image, 4 actors: 8 chunks wanted -> 5 of 2 units
    ("auto", 2, 4, 8, 2),        # 2 images, 4 actors: 4 chunks each
    ("auto", 1, 1, 10, 10),      # one actor: fan-out cannot help
    (3, 50, 2, 10, 3),
    (64, 1, 2, 10, 10),
    ("auto", 1, 8, 1, 1),
])
def test_units_per_chunk(fanout, images, actors, units, expected):
    assert units_per_chunk(fanout, images, actors, units) == expected


def test_expand_chunks_covers_every_unit_once_and_keeps_failed_rows_whole():
    batch = {"uri": np.array(["a", "b", "c"], dtype=object),
             "image_id": np.array(["1", "2", "3"], dtype=object),
             "error": np.array(["", "bad file", ""], dtype=object),
             "image": np.zeros((3, 2, 2, 3), np.uint8)}
    out = expand_chunks(batch, per_chunk=3, num_units=7)
    for image_id in ("1", "3"):
        rows = np.flatnonzero(out["image_id"] == image_id)
        units = sorted(u for r in rows for u in range(out["unit_start"][r], out["unit_stop"][r]))
        assert units == list(range(7))
        assert set(out["num_chunks"][rows]) == {3} and sorted(out["chunk"][rows]) == [0, 1, 2]
    bad = np.flatnonzero(out["image_id"] == "2")
    assert len(bad) == 1 and out["num_chunks"][bad[0]] == 1


def test_one_bad_image_fails_alone():
    def call(rows):
        if 3 in rows:
            raise RuntimeError("shape mismatch in this image")
        return [r * 10 for r in rows]

    outcomes, errors = score_or_bisect(call, list(range(8)))
    assert outcomes == {r: r * 10 for r in range(8) if r != 3}
    assert list(errors) == [3] and "shape mismatch" in errors[3]


def test_every_image_failing_is_the_model_not_the_images():
    def call(rows):
        raise RuntimeError("weights do not fit")

    with pytest.raises(ModelFault, match="every image"):
        score_or_bisect(call, [0, 1, 2])
    assert score_or_bisect(call, [0])[1]  # a single image cannot tell: it fails alone


def test_a_model_fault_is_never_split():
    calls = []

    def call(rows):
        calls.append(rows)
        raise ModelFault("non-finite")

    with pytest.raises(ModelFault):
        score_or_bisect(call, [0, 1, 2, 3])
    assert calls == [[0, 1, 2, 3]]


# ------------------------------------------------------------------ the lease


def test_a_second_run_is_refused_while_the_first_holds_the_output(tmp_path):
    out, storage = str(tmp_path / "out"), StorageConfig()
    with OutputLease(out, storage, "run-a", ttl_s=60):
        with pytest.raises(LeaseError, match="run-a"):
            OutputLease(out, storage, "run-b", ttl_s=60).acquire()
    with OutputLease(out, storage, "run-c", ttl_s=60) as lease:  # released: free again
        assert lease.generation == 2


def test_a_lease_whose_holder_died_or_went_silent_is_taken_over(tmp_path):
    out, storage = str(tmp_path / "out"), StorageConfig()
    folder = tmp_path / "out" / "_lotscan" / "lease"
    folder.mkdir(parents=True)
    # A holder on this host whose process is gone (a killed driver).
    (folder / "gen-000000001.json").write_text(json.dumps(
        {"run_id": "dead", "host": os.uname().nodename, "pid": 2**22 + 12345,
         "started_at": time.time()}))
    with OutputLease(out, storage, "next", ttl_s=60) as lease:
        assert lease.generation == 2
    # A holder on another host, silent for longer than the TTL.
    (folder / "gen-000000003.json").write_text(json.dumps(
        {"run_id": "far", "host": "elsewhere", "pid": 1, "started_at": time.time() - 100}))
    with pytest.raises(LeaseError, match="far"):
        OutputLease(out, storage, "impatient", ttl_s=200).acquire()
    with OutputLease(out, storage, "patient", ttl_s=50) as lease:
        assert lease.generation == 4


def test_the_lease_works_on_s3(s3_storage):
    storage, bucket = s3_storage
    out = f"{bucket}/scores"
    with OutputLease(out, storage, "a", ttl_s=60):
        with pytest.raises(LeaseError):
            OutputLease(out, storage, "b", ttl_s=60).acquire()


def test_a_lease_waits_when_asked(tmp_path):
    out, storage = str(tmp_path / "out"), StorageConfig()
    first = OutputLease(out, storage, "a", ttl_s=2).acquire()
    first._stop.set()  # stop its heartbeat: it goes silent and expires
    started = time.time()
    with OutputLease(out, storage, "b", ttl_s=2, wait_s=10) as lease:
        assert lease.generation == 2
    assert time.time() - started >= 1.0


# --------------------------------------------------------------- summaries


def _frame(n, rng, lot="L1"):
    return pd.DataFrame({
        "image_id": [f"{lot}{i:04d}" for i in range(n)], "uri": [f"/x/{lot}{i:04d}.png" for i in range(n)],
        "lot_id": lot, "category": rng.choice(["a", "b"], n), "defect_type": rng.choice(["good", "x"], n),
        "label": rng.choice([0, 1, -1], n), "score": rng.gamma(2.0, 0.3, n), "threshold": 1.0,
        "heatmap_uri": "", "heatmap_max": np.nan,
    }).assign(decision=lambda f: f["score"] > 1.0)


def _failures(n, lot="L1"):
    return pd.DataFrame({"uri": [f"/f/{i}.png" for i in range(n)], "lot_id": lot, "category": "a",
                         "error": [f"/f/{i}.png: truncated ({i} bytes)" if i % 3 else
                                   f"/f/{i}.png: could not be read (timeout)" for i in range(n)],
                         "retryable": [i % 3 == 0 for i in range(n)]})


def test_merged_stats_give_the_reference_summary():
    """Stats merged over blocks == report.lot_summary over all rows, except that
    quantiles are exact to one histogram bin."""
    from lotscan.platform import drift, report

    rng = np.random.default_rng(0)
    a, b = _frame(300, rng, "L1"), _frame(200, rng, "L2")
    fails = _failures(7)
    reference = np.sort(rng.gamma(2.0, 0.3, 60))
    edges = drift.bin_edges(reference).tolist()
    model = {"method": "dta", "threshold": 1.0, "normal_fpr": 0.01}
    blank = Stats(threshold=1.0, report_edges=report.histogram_edges([1.0]), drift_edges=edges,
                  max_flagged=40, max_near=10)
    merged = Stats.from_json(blank.to_json()).add_results(a)
    merged.merge(Stats.from_json(blank.to_json()).add_results(b))
    merged.merge(Stats.from_json(Stats.from_json(blank.to_json()).add_failures(fails).to_json()))
    got = summarize(merged, model, "/out", ["/in"], drift.bin_counts(reference, edges).tolist(),
                    "v", "now")
    want = report.lot_summary(pd.concat([a, b]), fails, model, "/out", input_uris=["/in"],
                              reference_scores=reference, max_flagged=40, max_near=10,
                              generated_at="now")
    want["lotscan_version"] = "v"

    def strip(tree):  # quantiles are approximate: compare them apart
        if isinstance(tree, dict):
            return {k: strip(v) for k, v in tree.items() if k not in ("p50", "p90", "p99", "mean")}
        if isinstance(tree, list):
            return [strip(v) for v in tree]
        return round(tree, 9) if isinstance(tree, float) else tree

    assert strip(got) == strip(want)
    for q in ("p50", "p90", "p99"):
        assert abs(got["overall"]["score"][q] - want["overall"]["score"][q]) <= 4.0 / 400 + 1e-9
    assert got["overall"]["score"]["mean"] == pytest.approx(want["overall"]["score"]["mean"])
    assert got["flagged_truncated"] > 0 and len(got["flagged"]) == 40


def test_quantiles_from_a_histogram_are_within_one_bin():
    rng = np.random.default_rng(1)
    values = rng.uniform(0, 3, 5000)
    edges = np.linspace(0, 4, 401)
    hist = np.bincount(np.clip(np.searchsorted(edges, values, side="right") - 1, 0, 399), minlength=400)
    for q in (0.1, 0.5, 0.99):
        got = quantile_from_hist(hist.tolist(), edges, q, values.min(), values.max())
        assert abs(got - np.quantile(values, q)) <= 0.01 + 1e-9
