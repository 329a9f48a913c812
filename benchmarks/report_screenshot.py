"""Render a lot report and photograph it in a real headless browser.

Two sources:

* ``--out OUT_URI --model BUNDLE_URI``: a real output of ``lotscan score``
  (results/ and failures/ Parquet, heatmaps); cards are built from the source
  images and stored heatmaps at the bundle's image size.
* default (synthetic): seeded procedural images and heatmaps in several lots,
  with failures, a drifted lot (brighter: every score shifted) and enough
  flagged images to page; checks the layout without a trained model.

Writes ``report.html`` and one full-page PNG per ``--width`` (default 1400 and
400 px, a desktop and a phone) to ``--dest`` with Debian's chromium
(``apt-get install -y chromium``) in headless mode, and prints the sizes.

examples:
  python benchmarks/report_screenshot.py --dest /tmp/report-shots
  python benchmarks/report_screenshot.py --out demo-workdir/results --model demo-workdir/model \\
      --dest /tmp/report-demo
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pandas as pd
from PIL import Image

from lotscan.platform.regions import find_regions, region_rows
from lotscan.platform.report import card_images, lot_summary, render_report, trend_rows


def _texture(rng: np.random.Generator, size: int, brightness: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    weave = 0.5 + 0.25 * np.sin(xx / 2.3) * np.sin(yy / 2.1)
    noise = rng.normal(0, 0.05, (size, size))
    grey = np.clip(weave + noise + brightness, 0, 1)
    rgb = np.stack([grey * 0.9, grey * 0.8, grey * 0.6], axis=2)
    return np.round(rgb * 255).astype(np.uint8)


def synthetic(size: int = 64, seed: int = 0):
    """(results, failures, regions, model, reference, images, heatmaps) of four lots."""
    rng = np.random.default_rng(seed)
    threshold = 0.75

    def normal_score(shift: float) -> float:
        heat = np.abs(rng.normal(0, 0.12 + shift * 0.5, (size, size)))
        return float(heat.reshape(size // 4, 4, size // 4, 4).mean(axis=(1, 3)).max()) + shift

    reference = np.sort([normal_score(0.0) for _ in range(60)])  # the calibration images
    rows, images, heatmaps, region_tables = [], {}, {}, []
    # lot -> (brightness shift, defect rate): two quiet lots, one with a defect
    # burst, one after a lighting change (every score shifted: drift).
    lots = {"L2026-11-19": (0.0, 0.02), "L2026-11-20": (0.0, 0.15), "L2026-11-21": (0.0, 0.01),
            "L2026-11-22": (0.35, 0.02)}
    for lot, (shift, rate) in lots.items():
        for cat in ("weave", "speckle"):
            for i in range(40):
                defect = rng.random() < rate
                image = _texture(rng, size, brightness=shift * 0.3)
                heat = np.abs(rng.normal(0, 0.12 + shift * 0.5, (size, size)))
                defect_type = "good"
                if defect:
                    cy, cx = rng.integers(8, size - 8, 2)
                    r = int(rng.integers(3, 8))
                    yy, xx = np.mgrid[0:size, 0:size]
                    blob = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
                    heat[blob] += rng.uniform(0.8, 2.0)
                    image[blob] = (image[blob] * 0.4).astype(np.uint8)
                    defect_type = str(rng.choice(["scratch", "hole", "stain"]))
                pooled = heat.reshape(size // 4, 4, size // 4, 4).mean(axis=(1, 3))
                score = float(pooled.max()) + shift
                image_id = f"{lot[-2:]}{cat[:2]}{i:03d}"
                uri = f"s3://factory-lots/{lot}/{cat}/img_{i:04d}.png"
                decision = score >= threshold
                rows.append({"image_id": image_id, "uri": uri, "lot_id": lot, "category": cat,
                             "defect_type": defect_type, "label": int(defect), "score": score,
                             "threshold": threshold, "decision": decision,
                             "heatmap_uri": f"s3://scores/heatmaps/{lot}/{image_id}.npy",
                             "heatmap_max": float("nan")})
                if decision:
                    _, regions = find_regions(heat, threshold)
                    region_tables += region_rows(image_id, regions)
                images[image_id], heatmaps[image_id] = image, heat
    results = pd.DataFrame(rows)
    failures = pd.DataFrame([
        {"image_id": f"f{k}", "uri": f"s3://factory-lots/L2026-11-22/weave/bad_{k}.png",
         "lot_id": "L2026-11-22", "category": "weave",
         "error": f"s3://factory-lots/L2026-11-22/weave/bad_{k}.png: cannot decode image: "
                  f"truncated file ({1000 + k} bytes)"} for k in range(3)
    ] + [{"image_id": "g1", "uri": "s3://factory-lots/L2026-11-21/speckle/x.tif",
          "lot_id": "L2026-11-21", "category": "speckle",
          "error": "s3://factory-lots/L2026-11-21/speckle/x.tif: could not be read (timeout)",
          "retryable": True}])
    failures["retryable"] = failures.get("retryable", False)
    failures["retryable"] = failures["retryable"].fillna(False).astype(bool)
    model = {"method": "dta", "model_id": "dta-5f3c0a9e12ab", "model_uri": "s3://models/line3-dta",
             "threshold": threshold, "calibration_images": 60, "threshold_images": 60,
             "normal_fpr": 0.01}
    return (results, failures, pd.DataFrame(region_tables), model, reference.tolist(),
            images, heatmaps)


def from_output(out: str, model_uri: str):
    """The same tuple from a real ``lotscan score`` output (local paths only)."""
    from lotscan.platform.images import decode_image

    def table(kind: str) -> pd.DataFrame:
        files = sorted(glob.glob(os.path.join(out, kind, "**", "*.parquet"), recursive=True))
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files \
            else pd.DataFrame()

    results, failures = table("results"), table("failures")
    with open(os.path.join(model_uri, "bundle.json")) as f:
        manifest = json.load(f)
    calib = manifest.get("calibration") or {}
    size = int(manifest["image_size"])
    model = {"method": manifest["method"], "model_id": manifest.get("model_id"),
             "model_uri": model_uri, "threshold": calib.get("threshold"),
             "calibration_images": calib.get("num_images"),
             "normal_fpr": calib.get("normal_fpr")}
    reference = calib.get("normal_scores")
    images, heatmaps, region_tables = {}, {}, []
    for row in results.itertuples():
        if not (row.decision or row.score >= 0.8 * row.threshold):
            continue
        with open(row.uri, "rb") as f:
            images[row.image_id] = decode_image(f.read(), size, row.uri, 50_000_000)
        if row.heatmap_uri.endswith(".npy"):
            heat = np.load(row.heatmap_uri, allow_pickle=False)
        else:
            with Image.open(row.heatmap_uri) as im:
                heat = np.asarray(im, dtype=np.float64) / 65535.0 * row.heatmap_max
        heatmaps[row.image_id] = heat
        region_tables += region_rows(row.image_id, find_regions(heat, row.threshold)[1])
    return results, failures, pd.DataFrame(region_tables), model, reference, images, heatmaps


def screenshot(html_path: str, png_path: str, width: int, height: int) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--user-data-dir={profile}",
                        f"--window-size={width},{height}", f"--screenshot={png_path}",
                        "file://" + os.path.abspath(html_path)],
                       check=True, capture_output=True, timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output of lotscan score (local); default: synthetic lots")
    parser.add_argument("--model", help="the bundle that scored --out")
    parser.add_argument("--dest", default="report-shots")
    parser.add_argument("--width", type=int, action="append")
    parser.add_argument("--height", type=int, default=0,
                        help="window height (default: tall enough for the page, max 16000)")
    args = parser.parse_args()
    os.makedirs(args.dest, exist_ok=True)
    if args.out:
        results, failures, regions, model, reference, images, heatmaps = from_output(
            args.out, args.model)
        inputs = sorted(set(os.path.dirname(os.path.dirname(u)) for u in results["uri"]))[:1]
    else:
        results, failures, regions, model, reference, images, heatmaps = synthetic()
        inputs = ["s3://factory-lots/"]
    summary = lot_summary(results, failures, model, args.out or "s3://scores/2026-11-22",
                          input_uris=inputs, reference_scores=reference, regions=regions,
                          max_flagged=60)
    cards = {}
    for row in summary["flagged"] + summary["near_threshold"]:
        if row["image_id"] in images:
            cards[row["image_id"]] = card_images(images[row["image_id"]],
                                                 heatmaps[row["image_id"]], row["threshold"])
    html = render_report(summary, cards, trend_rows(summary))
    html_path = os.path.join(args.dest, "report.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(html)
    with open(os.path.join(args.dest, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    card_bytes = sum(len(c["image_png"]) + len(c["overlay_png"]) for c in cards.values())
    print(f"report.html: {len(html.encode()) / 1024:.0f} KiB, {len(cards)} cards, "
          f"{card_bytes / max(len(cards), 1) / 1024:.1f} KiB of PNG per card")
    for width in args.width or [1400, 400]:
        png = os.path.join(args.dest, f"report-{width}px.png")
        screenshot(html_path, png, width, args.height or (9000 if width < 800 else 5000))
        with Image.open(png) as im:
            print(f"{png}: {im.size[0]} x {im.size[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

