"""The scoring job on a two-node Ray cluster simulated on this machine
(``ray.cluster_utils.Cluster``, a GPU declared on each node so the GPU
scheduling path runs on CPU): fan-out across actors on both nodes gives the
maps and scores of scoring each image in one process, and one image's units
run on both; a re-run adds nothing; no image has two rows. DTA (levels) and
DRDC (mask sets, with a base map counted once) here; every method's chunked
partials are checked against in-actor scoring in tests/test_scoring_units.py.
Runs in a subprocess: a test session has one Ray already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    import ray
    from ray.cluster_utils import Cluster
    sys.path.insert(0, TESTS)
    from pipeline_util import random_bundle
    from lotscan.config import StorageConfig
    from lotscan.models.scoring import Scorer
    from lotscan.platform.bundles import open_bundle
    from lotscan.platform.decode import decode_checked
    from lotscan.platform.images import content_seed
    from lotscan.platform.readers import list_scoring_rows
    from lotscan.platform.scoring import read_table, score_lots
    from lotscan.platform.scoring.outputs import read_heatmap

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 1, "object_store_memory": 150 * 2**20, "include_dashboard": False})
    cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=150 * 2**20)
    ray.init(address=cluster.address, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    storage = StorageConfig()
    report = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}
    for method in ("dta", "drdc"):
        model = random_bundle(method, f"{WORK}/{method}", ROOT)
        out = f"{WORK}/out-{method}"
        options = {"categories": ["weave"], "log": lambda m: None,
                   "overrides": {"score": {"fanout": 1, "num_actors": 2, "batch_size": 1}}}
        score_lots(model, ROOT, out, **options)
        again = score_lots(model, ROOT, out, **options) if method == "dta" else {"scored": 0}
        results = read_table(out, "results", storage)
        bundle = open_bundle(model, storage)
        scorer = Scorer(bundle.method, bundle.calibration)
        rows = list_scoring_rows(ROOT, storage, ["weave"])
        images = [decode_checked(r["uri"], storage, bundle.config.data)[0] for r in rows]
        want = scorer.score(np.stack(images), [content_seed(i) for i in images])
        got = results.set_index("image_id").loc[[r["image_id"] for r in rows]]
        maps = np.stack([read_heatmap(u, storage) for u in got["heatmap_uri"]])
        report[method] = {
            "rows": len(results), "unique": int(results["image_id"].nunique()),
            "rerun_scored": again["scored"],
            "max_score_diff": float(np.max(np.abs(got["score"].to_numpy() - want.image_scores))),
            "max_map_diff": float(np.max(np.abs(maps - want.anomaly_maps))),
            "max_map": float(np.max(np.abs(want.anomaly_maps))),
            "actors": sorted({a for s in got["scored_by"] for a in s.split(",")}),
            "spread": bool(got["scored_by"].str.contains(",").any()),
        }
    print("REPORT " + json.dumps(report))
    ray.shutdown()
    cluster.shutdown()
''')


def test_fan_out_on_a_simulated_two_node_cluster(demo_root, tmp_path):
    tests = os.path.dirname(__file__)
    script = f"TESTS = {tests!r}\nWORK = {str(tmp_path)!r}\nROOT = {demo_root!r}\n" + SCRIPT
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=1200, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("REPORT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(lines[-1][len("REPORT "):])
    assert report["nodes"] == 2
    for method in ("dta", "drdc"):
        r = report[method]
        assert r["rows"] == r["unique"] == 6, r
        assert r["rerun_scored"] == 0, r
        assert r["max_score_diff"] <= 1e-3 * max(1.0, r["max_map"]) + 2e-4, r
        assert r["max_map_diff"] <= 1e-3 * max(1.0, r["max_map"]) + 2e-4, r
        # One actor per node (each asks for a whole declared GPU), and an image's
        # units on both.
        assert len(r["actors"]) == 2 and r["spread"], r
