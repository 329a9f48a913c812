"""Driver scale: list + resume + plan of a huge lot on the driver, with and without results.

Makes a manifest of N rows (URIs of images that need not exist: nothing is
decoded) and, for the "resume" case, result part files holding the ids of a
share of them, laid out as a scoring output; then runs the driver's part of
``lotscan score`` (distributed listing, reading the done ids, dropping them,
materialising and counting what is left to score) and reports wall time and
the driver process's peak memory (ru_maxrss). One process per case, so peaks
do not mix.

    python benchmarks/driver_scale.py --rows 1000000 --done 900000 --workdir /tmp/driver-scale
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time


def make_inputs(workdir: str, rows: int, done: int) -> tuple[str, str]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = os.path.join(workdir, f"lot-{rows}.parquet")
    out = os.path.join(workdir, f"out-{rows}-{done}")
    if not os.path.exists(manifest):
        uris = [f"s3://factory-lots/2026-11-22/station-{i % 8}/img_{i:08d}.png" for i in range(rows)]
        pq.write_table(pa.table({"uri": uris, "serial": [f"SN{i:09d}" for i in range(rows)]}),
                       manifest)
    if done and not os.path.exists(out):
        ids = [hashlib.sha256(f"s3://factory-lots/2026-11-22/station-{i % 8}/img_{i:08d}.png"
                              .encode()).hexdigest()[:16] for i in range(done)]
        folder = os.path.join(out, "results", "lot=lot")
        os.makedirs(folder)
        step = 512  # a write batch's worth of rows per part file, as the job writes them
        for k in range(0, done, step):
            chunk = ids[k:k + step]
            pq.write_table(pa.table({"image_id": chunk, "score": np.zeros(len(chunk))}),
                           os.path.join(folder, f"part-{k:08d}.parquet"))
    return manifest, out


def run_case(manifest: str, out: str) -> dict:
    import ray

    from lotscan.config import StorageConfig
    from lotscan.platform.runtime import ensure_ray
    from lotscan.platform.scoring.listing import list_rows
    from lotscan.platform.scoring.resume import drop_done, id_refs, partitions_for, result_ids

    ensure_ray(num_cpus=os.cpu_count(), include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    storage = StorageConfig()
    started = time.time()
    rows = list_rows(manifest, storage).materialize()
    listed = rows.count()
    t_listed = time.time()
    done = result_ids(out, storage) if os.path.isdir(out) else None
    refs, n_done = id_refs(done) if done is not None else ([], 0)
    t_ids = time.time()
    todo = drop_done(rows, refs, n_done, True, partitions_for(listed, os.cpu_count()),
                     5_000_000).materialize()
    left = todo.count()
    wall = time.time() - started
    return {"listed": listed, "done": n_done, "to_score": left, "wall_s": round(wall, 1),
            "listing_s": round(t_listed - started, 1), "done_ids_s": round(t_ids - t_listed, 1),
            "drop_s": round(time.time() - t_ids, 1),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--done", type=int, default=900_000)
    parser.add_argument("--workdir", default="/tmp/lotscan-driver-scale")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    if args.case:
        manifest, out = args.case.split("|")
        print(json.dumps(run_case(manifest, out)))
        return
    for done in (0, args.done):
        manifest, out = make_inputs(args.workdir, args.rows, done)
        proc = subprocess.run([sys.executable, __file__, "--case", f"{manifest}|{out}",
                               "--workdir", args.workdir], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        print(json.dumps({"rows": args.rows, "with_results": done, **(json.loads(line[-1]) if line
                                                                    else {"error": proc.stderr[-2000:]})}))


if __name__ == "__main__":
    main()
