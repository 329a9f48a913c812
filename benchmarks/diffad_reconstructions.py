"""DiffAD's reconstruction diagnostics (the paper, Sec. 4.2): on the defective
test images of a category, PSNR between the input x_a and its reconstruction
x_r inside the ground-truth defect ("direct copy": higher means the defect was
copied rather than repaired), and in the normal region PSNR of x_r against
x_inter (p1), the decoded input latent x~_a (p2) and the input x_a (p3); the
paper reports p1 > p2 > p3.

  .venv/bin/python benchmarks/diffad_reconstructions.py --model runs/texbench/brick/diffad/full \\
      --data ../shared/datasets/texbench-dev --category brick
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from lotscan.config import StorageConfig
from lotscan.models.method import unit_noise
from lotscan.models.scoring import to_model_input
from lotscan.platform.bundles import open_bundle
from lotscan.platform.decode import decode_one
from lotscan.platform.images import content_seed, decode_mask
from lotscan.platform.readers import list_scoring_rows
from lotscan.platform.storage import read_bytes


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """PSNR over the pixels where ``where`` holds, images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a - b) ** 2).mean(dim=1)[where].mean().item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    storage = StorageConfig()
    bundle = open_bundle(args.model, storage)
    method, cfg = bundle.method.eval(), bundle.config
    size = cfg.data.image_size
    rows = [r for r in list_scoring_rows(args.data, storage, [args.category]) if r["label"] == 1]
    inside, p1, p2, p3 = [], [], [], []
    for row in rows:
        image, error = decode_one(row["uri"], storage, cfg.data)
        if error:
            continue
        mask = decode_mask(read_bytes(row["mask_uri"], storage), (size, size), row["mask_uri"],
                           cfg.data.max_image_pixels)
        defect = torch.from_numpy(mask)[None]
        if not defect.any():
            continue
        x = to_model_input(image[None], "cpu")
        with torch.no_grad():
            c = method.condition(x)
            z_t = unit_noise([content_seed(image)], 0, tuple(c.shape[1:]), "cpu")
            x_r, x_inter = method.reconstruct(c, z_t, None, cfg.diffad.sample_steps)
            x_tilde = method.networks["autoencoder"].decode(
                method.latent_denoiser.denormalise(c)).sample.clamp(-1, 1)
        inside.append(psnr(x, x_r, defect))
        normal = ~defect
        if x_inter is not None:
            p1.append(psnr(x_inter, x_r, normal))
        p2.append(psnr(x_tilde, x_r, normal))
        p3.append(psnr(x, x_r, normal))
    out = {
        "model": args.model, "images": len(inside),
        "psnr_defect_x_a_vs_x_r": float(np.mean(inside)),
        "psnr_normal_x_inter_vs_x_r (p1)": float(np.mean(p1)) if p1 else None,
        "psnr_normal_x_tilde_a_vs_x_r (p2)": float(np.mean(p2)),
        "psnr_normal_x_a_vs_x_r (p3)": float(np.mean(p3)),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
