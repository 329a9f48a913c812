"""The scoring pipeline on a local Ray: distributed listing against the
reference reader, resume by broadcast and by anti-join, every method's
fan-out equal to in-actor scoring, and one row per image whatever was re-run."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from conftest import upload_tree
from lotscan.config import StorageConfig
from lotscan.platform import readers
from lotscan.platform.scoring import read_table, score_lots
from lotscan.platform.scoring.listing import list_rows
from lotscan.platform.scoring.outputs import read_heatmap
from lotscan.platform.scoring.resume import ID_DTYPE, drop_done
from pipeline_util import random_bundle

pytestmark = [pytest.mark.ray, pytest.mark.slow]

KEYS = list(readers.ROW_KEYS)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[KEYS].sort_values("uri").reset_index(drop=True)


def test_listing_by_tasks_equals_the_reference_reader(ray_local, demo_root, s3_storage, tmp_path):
    storage, bucket = s3_storage
    remote = upload_tree(demo_root, f"{bucket}/demo", storage)
    cases = [(demo_root, StorageConfig(), None, None), (demo_root, StorageConfig(), ["speckle"], "L7"),
             (os.path.join(demo_root, "weave", "test"), StorageConfig(), None, None),
             (remote, storage, ["weave"], None)]
    for uri, cfg, categories, lot in cases:
        got = pd.DataFrame(list_rows(uri, cfg, categories, lot).take_all())
        want = pd.DataFrame(readers.list_scoring_rows(uri, cfg, categories, lot))
        pd.testing.assert_frame_equal(_sorted(got).astype(str), _sorted(want).astype(str))


def test_manifest_rows_keep_extra_columns_and_repeats_are_scored_once(ray_local, demo_root, tmp_path):
    images = sorted(os.path.join(demo_root, "weave", "test", "good", f)
                    for f in os.listdir(os.path.join(demo_root, "weave", "test", "good")))
    manifest = tmp_path / "lot-9.csv"
    frame = pd.DataFrame({"uri": images + images[:1], "serial": [f"SN{i}" for i in range(len(images) + 1)],
                          "station": "S2"})
    frame.to_csv(manifest, index=False)
    rows = pd.DataFrame(list_rows(str(manifest), StorageConfig()).take_all())
    assert set(rows.columns) >= set(KEYS) | {"serial", "station"} and len(rows) == len(images) + 1
    assert set(rows["lot_id"]) == {"lot-9"} and set(rows["station"]) == {"S2"}
    ds = list_rows(str(manifest), StorageConfig())
    done = [rows["image_id"].iloc[1]]
    import ray

    refs = [ray.put(np.sort(np.asarray(done, dtype=object).astype(ID_DTYPE)))]
    expected = sorted(set(rows["image_id"]) - set(done))  # the repeat once, the done one not
    joined = pd.DataFrame(drop_done(ds, refs, 1, True, 2, 0).take_all())  # anti-join
    assert sorted(joined["image_id"]) == expected
    hashed = pd.DataFrame(drop_done(ds, refs, 1, True, 3, 10).take_all())  # broadcast + dedupe
    assert sorted(hashed["image_id"]) == expected
    folder = pd.DataFrame(drop_done(ds.repartition(1), refs, 1, False, 2, 10).take_all())
    assert sorted(folder["image_id"]) == expected


@pytest.fixture(scope="module")
def dta_bundle(demo_root, tmp_path_factory):
    return random_bundle("dta", str(tmp_path_factory.mktemp("bundles") / "dta"), demo_root)


def test_fan_out_on_a_local_ray_gives_the_maps_of_in_actor_scoring(dta_bundle, ray_local, demo_root,
                                                                   tmp_path):
    quiet = {"log": lambda m: None, "categories": ["weave"]}
    off = score_lots(dta_bundle, demo_root, str(tmp_path / "off"),
                     overrides={"score": {"fanout": "off"}}, **quiet)
    fan = score_lots(dta_bundle, demo_root, str(tmp_path / "fan"),
                     overrides={"score": {"fanout": 1, "num_actors": 2, "batch_size": 2}}, **quiet)
    assert off["scored"] == fan["scored"] == 6 and off["failed"] == fan["failed"] == 0
    a = read_table(str(tmp_path / "off"), "results", StorageConfig()).set_index("image_id")
    b = read_table(str(tmp_path / "fan"), "results", StorageConfig()).set_index("image_id").loc[a.index]
    np.testing.assert_allclose(b["score"], a["score"], rtol=1e-5, atol=1e-6)
    for image_id in a.index:
        np.testing.assert_allclose(read_heatmap(b.loc[image_id, "heatmap_uri"], StorageConfig()),
                                   read_heatmap(a.loc[image_id, "heatmap_uri"], StorageConfig()),
                                   rtol=1e-4, atol=1e-5)
    assert (a["decision"] == b["decision"]).all()
    # Which actor takes which chunk depends on timing here; tests/test_multinode.py
    # shows one image's units on two actors of two nodes.


def _crops(n, seed, shift=0):
    from PIL import Image
    from skimage import data

    photo = data.brick()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        y, x = rng.integers(0, photo.shape[0] - 64, 2)
        crop = np.clip(photo[y:y + 64, x:x + 64].astype(int) + shift, 0, 255).astype(np.uint8)
        out.append(np.asarray(Image.fromarray(crop).convert("RGB").resize((32, 32))))
    return np.stack(out)


def _lot(folder, images):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.png"))
    return folder


def test_a_brighter_lot_raises_a_drift_alarm_and_a_normal_one_does_not(ray_local, tmp_path):
    """A lighting change shows up as drift against the calibration's normal scores
    (a denoiser trained briefly on brick crops; lots of unseen crops, one as
    photographed, one 70 grey levels brighter)."""
    from pipeline_util import briefly_trained_bundle

    model = briefly_trained_bundle(str(tmp_path / "model"), _crops(200, 5), _crops(60, 1))
    quiet = {"log": lambda m: None}
    same = score_lots(model, _lot(str(tmp_path / "lot-a"), _crops(40, 2)), str(tmp_path / "a"), **quiet)
    bright = score_lots(model, _lot(str(tmp_path / "lot-b"), _crops(40, 2, shift=70)),
                        str(tmp_path / "b"), **quiet)
    drift_a = same["summary"]["lots"]["lot-a"]["drift"][""]
    drift_b = bright["summary"]["lots"]["lot-b"]["drift"][""]
    assert drift_a["reference_n"] == drift_b["reference_n"] >= 20
    assert not drift_a["alarm"], drift_a
    assert drift_b["alarm"] and drift_b["ks"] > 2 * drift_a["ks"], drift_b
