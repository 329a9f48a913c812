"""What DiffAD's synthetic-anomaly kinds draw on real normal images, side by side
(``diffad.anomaly_kinds``): per kind and mask shape, the share of anomalous
samples left with an empty label (their edit changed no pixel by more than
``anomaly_change_threshold``), the label's area, the share of the drawn region
the label keeps, the mean change inside the label, and the synthesis time of a
batch (every kind timed in the same run, interleaved, so only ratios mean
anything). Optionally writes a picture: per kind a row of x_a and a row of labels.

  .venv/bin/python benchmarks/diffad_anomaly_kinds.py --data ../shared/datasets/texbench-dev \\
      --category brick [--size 64] [--n 32] [--batches 8] [--png runs/anomaly_kinds_brick.png]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from lotscan.config import DataConfig, StorageConfig
from lotscan.models.methods.diffad.anomaly import AnomalySynthesizer, SynthesizerSettings
from lotscan.models.scoring import to_model_input
from lotscan.platform.decode import decode_one
from lotscan.platform.readers import list_training_rows

VARIANTS = (("texture", "perlin"), ("warp", "blob"), ("patch", "blob"), ("blur", "blob"),
            ("warp", "perlin"), ("patch", "perlin"), ("blur", "perlin"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n", type=int, default=32, help="images per batch")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", help="write x_a and label rows of the first batch here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    storage, data = StorageConfig(), DataConfig(image_size=args.size)
    rows = list_training_rows(args.data, storage, [args.category])[: args.n]
    decoded = [decode_one(r["uri"], storage, data) for r in rows]
    x = to_model_input(np.stack([img for img, err in decoded if not err]), "cpu")
    synths = {v: AnomalySynthesizer(SynthesizerSettings(anomaly_probability=1.0, kinds=(v[0],),
                                                        structural_mask=v[1])) for v in VARIANTS}
    stats: dict[tuple[str, str], dict[str, list[float]]] = {v: {} for v in VARIANTS}
    first = {}
    for b in range(args.batches):
        for v, synth in synths.items():
            g = torch.Generator().manual_seed(args.seed * 1000 + b)
            start = time.perf_counter()
            out = synth(x, g)
            elapsed = time.perf_counter() - start
            label = out.mask[:, 0] > 0
            region = out.region[:, 0] > 0
            s = stats[v]
            s.setdefault("ms", []).append(1000 * elapsed)
            s.setdefault("empty", []).extend((label.flatten(1).sum(1) == 0).float().tolist())
            s.setdefault("area", []).extend(label.flatten(1).float().mean(1).tolist())
            kept = label.flatten(1).sum(1) / region.flatten(1).sum(1).clamp_min(1)
            s.setdefault("kept", []).extend(kept.tolist())
            change = (out.x_a - x).abs().amax(1)[label]
            s.setdefault("change", []).append(float(change.mean() * 127.5) if len(change) else 0.0)
            if b == 0:
                first[v] = out
    print(f"{args.category}, {len(x)} train images at {args.size} px, {args.batches} batches, seed {args.seed}")
    print("| kind | mask | empty label | label area % (mean) | label / region | "
          "mean change in label (grey levels) | ms per batch (median) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for v in VARIANTS:
        s = stats[v]
        print(f"| {v[0]} | {v[1]} | {statistics.mean(s['empty']):.2f} | {100 * statistics.mean(s['area']):.1f} | "
              f"{statistics.mean(s['kept']):.2f} | {statistics.mean(s['change']):.0f} | "
              f"{statistics.median(s['ms']):.0f} |")
    if args.png:
        from PIL import Image

        k = min(8, len(x))
        rows_ = [torch.cat(list(x[:k]), 2)]
        for v in VARIANTS:
            rows_.append(torch.cat(list(first[v].x_a[:k]), 2))
            rows_.append(torch.cat(list(first[v].mask[:k].expand(-1, 3, -1, -1) * 2 - 1), 2))
        grid = ((torch.cat(rows_, 1).permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        Image.fromarray(grid).save(args.png)
        print(f"wrote {args.png}: row 1 the images, then per kind/mask above x_a and its label")


if __name__ == "__main__":
    main()
