"""Bounded load test of the online scoring endpoint (``lotscan serve``).

For every combination of ``--batch-size`` and ``--replicas`` it deploys the
Serve app on a local Ray (or the one at ``--ray-address``), binds HTTP to
127.0.0.1 only, sends a fixed number of requests from a fixed number of
concurrent clients (one warm-up round first), and reports throughput, latency
percentiles, the mean batch size the model actually saw and any non-200
answers. It stops by itself and shuts Serve down at the end.

The client runs on the same machine as the server: on a small machine the two
compete for the CPU, so read the figures as a comparison between settings.

examples:
  # tiny untrained DTA model built on the fly (CPU smoke figures, not a quality model)
  python benchmarks/serve_load.py --tiny /tmp/lotscan-bench --requests 96 --concurrency 8 \\
      --batch-size 1 --batch-size 8 --replicas 1 --replicas 2
  # a real bundle on a GPU machine
  python benchmarks/serve_load.py --model runs/brick-dta --requests 2000 --concurrency 64 \\
      --batch-size 1 --batch-size 16 --batch-size 32 --replicas 1 --cpus-per-replica 2
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tiny_bundle(workdir: str, method: str) -> str:
    """A tiny untrained bundle calibrated on procedural normal images (seconds on CPU)."""
    import torch

    from lotscan.config import load_config
    from lotscan.models.bundle import Bundle
    from lotscan.models.registry import build_method
    from lotscan.models.scoring import Scorer, calibrate
    from lotscan.platform.bundles import save_bundle
    from lotscan.platform.demo_data import make_demo_dataset
    from lotscan.platform.images import content_seed, decode_image

    out = os.path.join(workdir, f"tiny-{method}")
    if os.path.exists(os.path.join(out, "bundle.json")):
        return out
    cfg = load_config(overrides=[
        f"method={method}", "data.image_size=32", "denoiser.block_out_channels=[16, 32]",
        "dta.num_levels=3", "dta.max_noise_level=100", "recon.ddim_steps=2",
        "score.smoothing_kernel=3", "score.image_score_pool=3",
    ])
    root = make_demo_dataset(os.path.join(workdir, "data"), categories=("weave",), image_size=32,
                             n_train=8, n_test_good=2, n_test_defect=2, seed=0)
    paths = sorted(Path(root, "weave", "train", "good").glob("*.png"))
    images = np.stack([decode_image(p.read_bytes(), 32, str(p), cfg.data.max_image_pixels)
                       for p in paths])
    torch.manual_seed(0)
    net = build_method(cfg)
    calibration = calibrate(Scorer(net, None, "cpu"), [(images, [content_seed(i) for i in images])])
    save_bundle(Bundle(net, calibration, training={"note": "untrained benchmark model"}), out,
                cfg.storage)
    return out


def request_bodies(image_size: int, count: int = 16) -> list[bytes]:
    """Seeded smooth-noise PNGs at the model's size (decode cost stays small)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(count):
        low = rng.integers(0, 256, (image_size // 4, image_size // 4, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((image_size, image_size), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        bodies.append(buf.getvalue())
    return bodies


async def load(url: str, bodies: list[bytes], total: int, concurrency: int,
               headers: dict[str, str]) -> tuple[list[dict[str, Any]], float]:
    """``total`` POSTs from ``concurrency`` clients; returns per-request records and wall time."""
    import httpx

    todo = list(range(total))
    records: list[dict[str, Any]] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while todo:
            i = todo.pop()
            start = time.perf_counter()
            try:
                r = await client.post(url, content=bodies[i % len(bodies)], headers=headers)
                status = r.status_code
                batch = r.json().get("batch_size", 0) if status == 200 else 0
            except Exception as err:  # a refused connection is a result, not a crash
                status, batch = f"{type(err).__name__}", 0
            records.append({"status": status, "ms": (time.perf_counter() - start) * 1000.0,
                            "batch_size": batch})

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return records, time.perf_counter() - started


def summarise(records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == 200]
    ms = np.array([r["ms"] for r in ok]) if ok else np.zeros(1)
    other: dict[str, int] = {}
    for r in records:
        if r["status"] != 200:
            other[str(r["status"])] = other.get(str(r["status"]), 0) + 1
    return {
        "requests": len(records), "ok": len(ok), "errors": other,
        "throughput_rps": round(len(ok) / wall_s, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "mean_batch_size": round(float(np.mean([r["batch_size"] for r in ok])), 2) if ok else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="BUNDLE_URI", help="bundle to serve")
    source.add_argument("--tiny", metavar="DIR", help="build (or reuse) a tiny untrained bundle in DIR")
    parser.add_argument("--method", default="dta", choices=("dta", "recon"), help="with --tiny")
    parser.add_argument("--requests", type=int, default=96, help="requests per setting")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients")
    parser.add_argument("--batch-size", type=int, action="append", metavar="N",
                        help="serve.max_batch_size to measure (repeatable; default 1 and 8)")
    parser.add_argument("--replicas", type=int, action="append", metavar="R",
                        help="model replicas to measure (repeatable; default 1)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--cpus-per-replica", type=float, default=None,
                        help="default: what fits the local Ray's CPUs beside the ingress, at most 1")
    parser.add_argument("--torch-threads", type=int, default=1, help="per replica (0: Ray default)")
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    parser.add_argument("--ray-address", default=None, help="join this Ray instead of a local one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override, e.g. storage.endpoint_url=...")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from lotscan.config import _deep_update, parse_override
    from lotscan.platform.runtime import ensure_ray
    from lotscan.platform.serving import bundle_manifest, start_app

    model = args.model or tiny_bundle(args.tiny, args.method)
    extra: dict[str, Any] = {}
    for text in args.overrides:
        _deep_update(extra, parse_override(text))
    image_size = int(bundle_manifest(model, extra)["image_size"])
    bodies = request_bodies(image_size)
    ensure_ray(args.ray_address, num_cpus=args.num_cpus, include_dashboard=False)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    port = free_port()
    rows = []
    try:
        for replicas in args.replicas or [1]:
            for batch in args.batch_size or [1, 8]:
                ingress_cpus = 0.25
                per_replica = args.cpus_per_replica
                if per_replica is None:
                    per_replica = max(0.1, min(1.0, (cpus - ingress_cpus) / replicas))
                overrides = json.loads(json.dumps(extra))
                overrides.setdefault("serve", {}).update({
                    "host": "127.0.0.1", "port": port, "num_replicas": replicas,
                    "max_batch_size": batch, "batch_wait_timeout_s": args.batch_wait_ms / 1000.0,
                    "max_ongoing_requests": max(2 * batch, 4),
                    "max_queued_requests": max(args.requests, args.concurrency) * 2,
                    "num_cpus_per_replica": per_replica, "ingress_num_cpus": ingress_cpus,
                    "torch_threads": args.torch_threads, "request_timeout_s": 120.0,
                    "auth_token_env": "", "num_gpus_per_replica": None,
                })
                url = start_app(model, overrides, name="lotscan-bench", log=lambda _m: None)
                score_url = f"{url}/v1/score"
                headers = {"Content-Type": "image/png"}
                asyncio.run(load(score_url, bodies, min(args.concurrency * 2, args.requests),
                                 args.concurrency, headers))  # warm-up
                records, wall = asyncio.run(load(score_url, bodies, args.requests,
                                                 args.concurrency, headers))
                row = {"replicas": replicas, "max_batch_size": batch,
                       "cpus_per_replica": round(per_replica, 3), **summarise(records, wall)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        serve.delete("lotscan-bench")
        if not (args.ray_address or os.environ.get("RAY_ADDRESS")):
            serve.shutdown()

    try:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    except Exception:
        gpu = "unknown"
    print()
    print(f"model {model}, image size {image_size}, {args.requests} requests per row, "
          f"{args.concurrency} concurrent clients, batch wait {args.batch_wait_ms:g} ms, "
          f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), GPU: {gpu}")
    print()
    print("| replicas | max batch | CPUs/replica | req/s | p50 ms | p95 ms | p99 ms | mean batch | non-200 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['replicas']} | {r['max_batch_size']} | {r['cpus_per_replica']:g} | "
              f"{r['throughput_rps']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
              f"{r['mean_batch_size']} | {sum(r['errors'].values()) or 0} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model, "rows": rows,
                                               "argv": sys.argv[1:]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
