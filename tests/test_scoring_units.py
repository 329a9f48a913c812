"""The scoring actors' work without Ray: for every method, fan-out chunks
reduced by image give the maps and scores of one actor running all units; an
image that makes the scorer raise fails alone; a broken model stops."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lotscan.platform.decode import DecodeBatch
from lotscan.platform.scoring.faults import ModelFault
from lotscan.platform.scoring.reduce import ReduceImages
from lotscan.platform.scoring.units import ComputePartials, ScoreImages, expand_chunks
from pipeline_util import random_bundle

METHODS = ["recon", "dta", "diffad", "drdc"]


@pytest.fixture(scope="module")
def bundles(demo_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("unit-bundles")
    return {m: random_bundle(m, str(root / m), demo_root) for m in METHODS}


def _decoded(demo_root, host):
    import os

    from lotscan.platform.readers import list_scoring_rows

    rows = list_scoring_rows(demo_root, host.cfg.storage, ["weave"])
    frame = pd.DataFrame(rows)
    batch = {k: frame[k].to_numpy(dtype=object if frame[k].dtype == object else None) for k in frame}
    out = DecodeBatch(host.cfg.storage, host.cfg.data)(batch)
    assert all(os.path.exists(u) for u in out["uri"])
    return out


@pytest.mark.parametrize("method", METHODS)
def test_chunks_reduced_by_image_equal_one_actor_running_all_units(method, bundles, demo_root):
    whole = ScoreImages(bundles[method], {})
    batch = _decoded(demo_root, whole)
    expected = whole(batch)
    units = whole.scorer.method.num_units()
    per_chunk = max(1, units // 2) if units > 1 else 1
    chunks = expand_chunks(batch, per_chunk, units)
    partials = ComputePartials(bundles[method], {})
    rows = partials({k: v[::-1] for k, v in chunks.items()})  # any order
    reducer = ReduceImages(bundles[method], {})
    got = {}
    for image_id in np.unique(rows["image_id"]):
        pick = rows["image_id"] == image_id
        out = reducer({k: np.asarray(v)[pick] for k, v in rows.items()})
        got[image_id] = (out["score"][0], out["heatmap"][0])
    for i, image_id in enumerate(expected["image_id"]):
        score, heatmap = got[image_id]
        # Calibrated maps (normalised units): float rounding of differently batched
        # convolutions, amplified by the calibration ranges of these random models.
        assert score == pytest.approx(expected["score"][i], rel=1e-3, abs=1e-4)
        np.testing.assert_allclose(heatmap, expected["heatmap"][i], rtol=1e-3, atol=2e-4)


def test_an_image_that_makes_the_scorer_raise_fails_alone(bundles, demo_root, monkeypatch):
    actor = ScoreImages(bundles["dta"], {})
    batch = _decoded(demo_root, actor)
    bad_seed = int(batch["seed"][2])
    method = actor.scorer.method
    original = method.partial

    def partial(images, seeds, units):
        if bad_seed in [int(s) for s in seeds]:
            raise RuntimeError("an index out of range for this image")
        return original(images, seeds, units)

    monkeypatch.setattr(method, "partial", partial)
    out = actor(batch)
    errors = list(out["error"])
    assert "the scorer failed on this image" in errors[2] and "index out of range" in errors[2]
    assert out["error_kind"][2] == "permanent"
    assert all(not e for i, e in enumerate(errors) if i != 2)
    assert np.isfinite(np.delete(out["score"], 2)).all()


def test_a_model_failing_on_every_image_or_on_the_probe_stops(bundles, demo_root, monkeypatch):
    actor = ScoreImages(bundles["dta"], {})
    batch = _decoded(demo_root, actor)

    def broken(images, seeds, units):
        raise RuntimeError("size mismatch in the UNet")

    monkeypatch.setattr(actor.scorer.method, "partial", broken)
    with pytest.raises(ModelFault, match="every image"):
        actor(batch)
    monkeypatch.setattr(torch.nn.Module, "__call__",
                        lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError("broken")))
    with pytest.raises(ModelFault, match="probe image"):
        ScoreImages(bundles["dta"], {})
