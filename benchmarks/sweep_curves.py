"""Curves behind the DTA-vs-recon comparison, from one trained denoiser.

For every test image of a category (MVTec layout) this computes one-step
(Tweedie) x0 predictions at a grid of noise levels with the image's shared,
content-seeded noise, then, without recomputing anything:

- the single-level baseline: pixel AUROC / AP of |x0 - x0*|x_t| at each t;
- DTA's intensity trend (the paper's variant A) for sweeps 0..t_max with K
  levels, for each t_max: pixel AUROC / AP of the DFT-index-1 magnitude;
- where the signal is: mean |x0*|x_t - x0| on defect pixels, on normal pixels
  of the same images, and the per-level trend share of normal pixels.

Pixel metrics pool all test images at ground-truth resolution (maps upsampled
as `lotscan evaluate` does). The normalisation DTA applies is a global
monotone map, so it does not change these rank metrics.

  .venv/bin/python benchmarks/sweep_curves.py --model runs/texbench/brick/dta-t150 \
      --data ../shared/datasets/texbench-dev --category brick
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from lotscan.config import StorageConfig
from lotscan.models.diffusion import tweedie_x0
from lotscan.models.method import unit_noise
from lotscan.models.metrics import pixel_ap, pixel_auroc
from lotscan.models.reduction import FourierTrend
from lotscan.models.scoring import mean_filter, to_model_input
from lotscan.platform.bundles import open_bundle
from lotscan.platform.decode import decode_one
from lotscan.platform.images import content_seed, decode_mask
from lotscan.platform.readers import list_scoring_rows
from lotscan.platform.storage import read_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--levels", default="25,50,75,100,150,200,300,400",
                   help="single levels and sweep maxima to evaluate")
    p.add_argument("--num-levels", type=int, default=9, help="K of the DTA sweeps")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    storage = StorageConfig()
    bundle = open_bundle(args.model, storage)
    method = bundle.method.eval()
    cfg = bundle.config
    rows = list_scoring_rows(args.data, storage, [args.category])
    maxima = [int(t) for t in args.levels.split(",")]
    k = args.num_levels
    needed = sorted({0, *maxima, *(round(i * m / k) for m in maxima for i in range(k + 1))})

    images, seeds, masks = [], [], []
    for row in rows:
        image, error = decode_one(row["uri"], storage, cfg.data)
        if error:
            continue
        images.append(image)
        seeds.append(content_seed(image))
        if row["mask_uri"]:
            masks.append(decode_mask(read_bytes(row["mask_uri"], storage), None, row["mask_uri"], 10**8))
        else:
            masks.append(None)
    full = next(m.shape for m in masks if m is not None)
    masks = [m if m is not None else np.zeros(full, bool) for m in masks]

    preds: dict[int, torch.Tensor] = {}  # t -> (N, 3, H, W)
    x = to_model_input(np.stack(images), "cpu")
    with torch.no_grad():
        for t in needed:
            outs = []
            for i in range(0, len(x), 16):
                xb = x[i:i + 16]
                noise = unit_noise(seeds[i:i + 16], 0, tuple(xb.shape[1:]), "cpu")
                tt = torch.full((len(xb),), t, dtype=torch.long)
                x_t = method.schedule.add_noise(xb, noise, tt)
                outs.append(xb if t == 0 else tweedie_x0(method.eps_model(), method.schedule, x_t, tt))
            preds[t] = torch.cat(outs)
            print(f"level {t}: done", flush=True)

    def metrics(maps: torch.Tensor) -> dict[str, float]:
        maps = mean_filter(maps, cfg.score.smoothing_kernel or method.default_smoothing_kernel)
        up = F.interpolate(maps.unsqueeze(1), size=full, mode="bilinear", align_corners=False)[:, 0]
        arr = [m.numpy().astype(np.float64) for m in up]
        return {"pixel_auroc": round(pixel_auroc(masks, arr), 4), "pixel_ap": round(pixel_ap(masks, arr), 4)}

    defect = torch.from_numpy(np.stack([
        F.interpolate(torch.from_numpy(m[None, None].astype(np.float32)), size=x.shape[-2:])[0, 0].numpy() > 0.5
        for m in masks]))
    has_defect = defect.flatten(1).any(1)
    out = {"model": bundle.model_id, "category": args.category, "images": len(images),
           "single_level": {}, "dta_intensity_trend": {}, "deviation": {}}
    for t in maxima:
        err = (x - preds[t]).abs().mean(1)
        out["single_level"][t] = metrics(err)
        dev_defect = float(err[defect].mean())
        normal_in_defective = (~defect) & has_defect.view(-1, 1, 1)
        out["deviation"][t] = {"defect_pixels": round(dev_defect, 4),
                               "normal_pixels": round(float(err[normal_in_defective].mean()), 4)}
    for m in maxima:
        levels = [round(i * m / k) for i in range(k + 1)]
        seq = torch.stack([preds[t] for t in levels], dim=1)  # (N, K+1, 3, H, W)
        trend = FourierTrend(k + 1, 1)
        part = trend.partial(seq, torch.arange(k + 1), "x")
        out["dta_intensity_trend"][m] = metrics(FourierTrend.finalize(part, "x").mean(1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
