"""How noisy is DTA's Hutchinson estimate of the Jacobian diagonal, and how many
probes does it need? Measured on the exact Jacobian of a stand-in denoiser, no
training needed.

The stand-in is the Bayes denoiser of a stationary Gaussian model of the
category's normal images (its cross-spectrum S(f), 3 x 3 per frequency,
estimated from the training images at the model's size): in the paper's
coordinates x_beta = x0 + sigma n its posterior mean is the Wiener filter
W(f) = S (S + sigma^2 I)^-1, and its Jacobian J = W is exactly the posterior
covariance over sigma^2 (Tweedie's second-order identity). J is constant over
the image, so every pixel has the same exact diagonal and the same trend; any
variation of the estimated trend map is estimator noise. The script runs the
DTA reduction (levels of the default sweep, DFT coefficient 1, mean over
channels, the scorer's mean filter) on probe estimates and reports the noise
of the final map relative to its exact value, for several probe counts, with
probes shared by all levels (lotscan, with shared noise) or drawn per level.

    .venv/bin/python benchmarks/dta_hutchinson_noise.py --data ../shared/datasets/texbench-dev --category brick
"""

from __future__ import annotations

import argparse
import math
from datetime import date
from pathlib import Path

import numpy as np
import torch

from lotscan.config import load_config
from lotscan.models.registry import build_method
from lotscan.models.scoring import mean_filter, to_model_input
from lotscan.platform.images import decode_image


def cross_spectrum(x: torch.Tensor) -> torch.Tensor:
    """S(f) (H, W, 3, 3) of images (N, 3, H, W), per pixel-count normalised."""
    n, _, h, w = x.shape
    spec = torch.fft.fft2(x - x.mean(dim=(0, 2, 3), keepdim=True))
    return torch.einsum("nchw,ndhw->hwcd", spec, spec.conj()) / (n * h * w)


def apply(w_f: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """J v for the stationary operator with transfer w_f (H, W, 3, 3); v (..., 3, H, W)."""
    return torch.fft.ifft2(torch.einsum("hwcd,...dhw->...chw", w_f, torch.fft.fft2(v))).real


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/texbench-dev")
    ap.add_argument("--category", default="brick")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=8, help="independent probe sets per setting")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. dta.max_noise_level=300")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = load_config(overrides=args.set)
    method = build_method(cfg)
    size = cfg.data.image_size
    folder = Path(args.data, args.category, "train", "good")
    files = sorted(folder.glob("*.png"))[: args.images]
    if not files:
        raise SystemExit(f"no training images (*.png) in {folder}")
    rgb = np.stack([decode_image(f.read_bytes(), size, f.name, 10**8) for f in files])
    x = to_model_input(rgb, "cpu").double()
    s_f = cross_spectrum(x)
    t = method.level_timesteps()
    sigma = method.schedule.sigma(t)
    eye = torch.eye(3, dtype=torch.complex128)
    w_levels = [s_f @ torch.linalg.inv(s_f + (sg.item() ** 2) * eye) for sg in sigma]
    n_lev, k = len(t), torch.arange(len(t), dtype=torch.float64)
    idx = cfg.dta.fourier_index
    tw = torch.exp(-2j * math.pi * idx * k / n_lev)  # DFT weights of the trend coefficient

    print(f"{args.category}: {len(files)} training images at {size} px; levels t = {t.tolist()} "
          f"({cfg.dta.level_spacing} spacing); {date.today()}")
    print("level | t | sigma | exact J_pp | column sum | off-diagonal rms / J_pp (one probe, one pixel)")
    exact_diag, exact_colsum = [], []
    for i, w_f in enumerate(w_levels):
        diag = torch.einsum("hwcc->c", w_f).real / (size * size)  # (3,)
        energy = (w_f.abs() ** 2).sum(dim=(0, 1, 2)) / (size * size)  # sum_q J_qp^2 per column channel
        colsum = w_f[0, 0].sum(dim=0).real  # J^T 1: transfer at f = 0, summed over output channels
        rel = ((energy - diag ** 2).clamp(min=0).sqrt() / diag).mean().item()
        exact_diag.append(diag)
        exact_colsum.append(colsum)
        print(f"{i:5d} | {t[i].item():3d} | {sigma[i].item():.3f} | {diag.mean().item():.4f} | "
              f"{colsum.mean().item():.4f} | {rel:.2f}")
    exact_diag = torch.stack(exact_diag)  # (levels, 3)
    exact_trend = (tw.view(-1, 1) * exact_diag).sum(dim=0).abs().mean().item()
    colsum_trend = (tw.view(-1, 1) * torch.stack(exact_colsum)).sum(dim=0).abs().mean().item()
    print(f"exact trend_u (every pixel): jacobian_diagonal {exact_trend:.4f}, column_sum {colsum_trend:.4f}")
    print("probes | probes per level | trend_u map: noise rms / exact | mean / exact | "
          f"(after {cfg.score.smoothing_kernel} px mean filter, interior)")
    g = torch.Generator().manual_seed(1)
    k_s = cfg.score.smoothing_kernel
    for probes in (1, 2, 4, 8):
        for shared in (True, False):
            maps = []
            for _ in range(args.repeats):
                u = torch.zeros(n_lev, 3, size, size, dtype=torch.float64)
                for _p in range(probes):
                    v_one = torch.randint(0, 2, (3, size, size), generator=g).double() * 2 - 1
                    for i, w_f in enumerate(w_levels):
                        v = v_one if shared else torch.randint(0, 2, (3, size, size), generator=g).double() * 2 - 1
                        u[i] += v * apply(w_f, v) / probes
                coef = (tw.view(-1, 1, 1, 1) * u).sum(dim=0).abs().mean(dim=0)  # (H, W)
                smooth = mean_filter(coef.unsqueeze(0), k_s)[0]
                maps.append(smooth[k_s:-k_s, k_s:-k_s])
            m = torch.stack(maps)
            print(f"{probes:6d} | {'shared' if shared else 'own':6s} | "
                  f"{(m.std() / exact_trend).item():.3f} | {(m.mean() / exact_trend).item():.3f}")


if __name__ == "__main__":
    main()
