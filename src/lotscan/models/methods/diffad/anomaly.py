"""Synthetic anomalies for DiffAD's training (DRAEM's recipe, in plain torch).

A Perlin noise map on a grid of ``2**a x 2**b`` cells (a, b drawn uniformly),
randomly rotated and thresholded, gives a blob-shaped binary mask ``m``; a
texture is blended inside it as DRAEM's ``augment_image`` does, with ``beta``
(the weight the image keeps) drawn uniformly in ``[0, max_opacity)``::

    x_a = (1 - m) * x + m * (beta * x + (1 - beta) * texture)

so outside the mask ``x_a`` is exactly ``x``, and inside it the texture weighs
``1 - beta``, in (0.2, 1] with DRAEM's 0.8: every anomalous sample shows its
texture at at least 20 %. A share ``1 - anomaly_probability`` of the samples
stays clean, with an empty mask.

Texture sources, in order of preference:

- textures given with :meth:`AnomalySynthesizer.set_textures` (e.g. DTD, as
  DRAEM uses), randomly flipped, rotated by multiples of 90 degrees and
  colour-jittered;
- otherwise other normal images of the same batch, rolled by a random shift,
  channel-permuted, sometimes inverted, rotated by multiples of 90 degrees
  and colour-jittered: no extra data is needed, and the pasted patch is
  in-domain in texture statistics but wrong in colour and structure;
- for a batch of one image, a procedural texture: two random colours mixed by
  a Perlin field.

Every random number comes from the given CPU ``torch.Generator``, so a batch's
anomalies are reproducible whatever device the images are on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from lotscan.config import DiffADConfig

MAX_MASK_ATTEMPTS = 10
"""A thresholded coarse Perlin map is often empty (its values rarely exceed the
threshold on a 1 x 1 grid); an anomalous sample redraws its map up to this many
times, so that the share of samples with an anomaly matches
``anomaly_probability`` (DRAEM kept the empty draws and relabelled them clean)."""


class SyntheticAnomalies(NamedTuple):
    x_a: torch.Tensor
    """(N, 3, H, W) images with the anomalies pasted in."""
    mask: torch.Tensor
    """(N, 1, H, W) binary float mask; all zero for clean samples."""
    texture: torch.Tensor
    """(N, 3, H, W) the texture each sample was blended with."""
    beta: torch.Tensor
    """(N,) DRAEM's beta of each sample, the image's weight inside the mask
    (the texture's is ``1 - beta``); 1 for clean samples, which are the image."""


@dataclass
class SynthesizerSettings:
    anomaly_probability: float = 0.5
    perlin_min_scale_exp: int = 0
    perlin_max_scale_exp: int = 4
    perlin_threshold: float = 0.5
    max_opacity: float = 0.8
    """Bound of beta, the image's weight inside the mask (DRAEM: 0.8)."""
    rotate: bool = True
    """Rotate the Perlin map by an angle in [-90, 90) degrees (DRAEM does)."""

    @classmethod
    def from_config(cls, cfg: DiffADConfig) -> SynthesizerSettings:
        return cls(cfg.anomaly_probability, cfg.perlin_min_scale_exp, cfg.perlin_max_scale_exp,
                   cfg.perlin_threshold, cfg.max_opacity)


def _uniform(generator: torch.Generator, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def perlin_noise(height: int, width: int, res_y: int, res_x: int, generator: torch.Generator) -> torch.Tensor:
    """2-D gradient noise (H, W) in [-1, 1] on a ``res_y x res_x`` grid of cells.

    Random unit gradients sit on the lattice corners; each pixel blends the dot
    products with its four corners with the quintic fade ``6t^5 - 15t^4 + 10t^3``.
    The result is scaled by sqrt(2) so that its range is [-1, 1].
    """
    angles = 2 * math.pi * torch.rand((res_y + 1, res_x + 1), generator=generator)
    grads = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
    ys = torch.arange(height, dtype=torch.float32) * res_y / height
    xs = torch.arange(width, dtype=torch.float32) * res_x / width
    iy, ix = ys.floor().long(), xs.floor().long()
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grads[(iy + dy)[:, None], (ix + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    def fade(t: torch.Tensor) -> torch.Tensor:
        return t * t * t * (t * (t * 6 - 15) + 10)

    wy, wx = fade(fy), fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), wx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), wx)
    return math.sqrt(2.0) * torch.lerp(top, bottom, wy)


def _rotate(maps: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate (N, 1, H, W) maps about their centre; reflection padding keeps the
    corners filled with noise rather than zeros."""
    theta = torch.deg2rad(degrees)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zeros = torch.zeros_like(cos)
    affine = torch.stack([torch.stack([cos, -sin, zeros], -1), torch.stack([sin, cos, zeros], -1)], 1)
    grid = F.affine_grid(affine, list(maps.shape), align_corners=False)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def rotate_normal_images(images: torch.Tensor, probability: float,
                         generator: torch.Generator) -> torch.Tensor:
    """DRAEM's (and DiffAD's official) rotation of normal training images: each
    image, with ``probability``, rotated about its centre by an angle uniform
    in [-90, 90] degrees, bilinearly, the uncovered corners black (-1), as
    ``iaa.Affine(rotate=(-90, 90))`` with its constant zero fill does. With
    ``probability`` 0 nothing is drawn from ``generator``."""
    if probability <= 0:
        return images
    n = images.shape[0]
    chosen = torch.rand(n, generator=generator) < probability
    degrees = _uniform(generator, n, low=-90.0, high=90.0)
    if not chosen.any():
        return images
    keep = (~chosen).to(images.device).view(-1, 1, 1, 1)
    return torch.where(keep, images, rotate_images(images, degrees))


def rotate_images(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Square images (N, C, H, W) in [-1, 1], each rotated about its centre by its
    angle (N,) in degrees, bilinearly; pixels from outside the image are black (-1)."""
    theta = torch.deg2rad(degrees.to(torch.float32)).to(images.device, images.dtype)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zeros = torch.zeros_like(cos)
    affine = torch.stack([torch.stack([cos, -sin, zeros], -1), torch.stack([sin, cos, zeros], -1)], 1)
    grid = F.affine_grid(affine, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


def perlin_masks(
    n: int, height: int, width: int, settings: SynthesizerSettings, generator: torch.Generator
) -> torch.Tensor:
    """``n`` non-empty (where possible) binary Perlin masks, (n, 1, H, W) float on CPU.
    The exponents are drawn in [min, max], both included (DRAEM's
    ``torch.randint(0, 6)`` is 0..5)."""
    lo, hi = settings.perlin_min_scale_exp, settings.perlin_max_scale_exp
    masks = torch.zeros(n, 1, height, width)
    pending = list(range(n))
    for _ in range(MAX_MASK_ATTEMPTS):
        if not pending:
            break
        exps = torch.randint(lo, hi + 1, (len(pending), 2), generator=generator)
        maps = torch.stack([
            perlin_noise(height, width, 2 ** int(a), 2 ** int(b), generator) for a, b in exps.tolist()
        ]).unsqueeze(1)
        if settings.rotate:
            maps = _rotate(maps, _uniform(generator, len(pending), low=-90.0, high=90.0))
        drawn = (maps > settings.perlin_threshold).float()
        still = []
        for k, i in enumerate(pending):
            masks[i] = drawn[k]
            if drawn[k].sum() == 0:
                still.append(i)
        pending = still
    return masks


def _rot90_each(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] != x.shape[-2]:
        return x
    return torch.stack([torch.rot90(img, int(k), dims=(-2, -1)) for img, k in zip(x, turns.tolist(), strict=True)])


def _colour_jitter(tex: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample contrast about the sample's mean, brightness shift and
    per-channel gain; pixel-independent, so a constant texture stays constant."""
    n = tex.shape[0]
    contrast = _uniform(generator, n, 1, 1, 1, low=0.6, high=1.4).to(tex.device)
    brightness = _uniform(generator, n, 1, 1, 1, low=-0.3, high=0.3).to(tex.device)
    gain = _uniform(generator, n, 3, 1, 1, low=0.8, high=1.2).to(tex.device)
    mean = tex.mean(dim=(1, 2, 3), keepdim=True)
    return (((tex - mean) * contrast + mean) * gain + brightness).clamp(-1.0, 1.0)


def _flip_rotate(tex: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = tex.shape[0]
    hflip = (torch.rand(n, generator=generator) < 0.5).to(tex.device).view(-1, 1, 1, 1)
    vflip = (torch.rand(n, generator=generator) < 0.5).to(tex.device).view(-1, 1, 1, 1)
    tex = torch.where(hflip, tex.flip(-1), tex)
    tex = torch.where(vflip, tex.flip(-2), tex)
    return _rot90_each(tex, torch.randint(0, 4, (n,), generator=generator))


class AnomalySynthesizer:
    """Turns batches of normal images into ``(x_a, mask)`` training pairs."""

    def __init__(self, settings: SynthesizerSettings):
        self.settings = settings
        self.textures: torch.Tensor | None = None  # (N, 3, H, W) uint8, CPU

    def set_textures(self, textures: np.ndarray | torch.Tensor | None) -> None:
        """Use these uint8 images (N, H, W, 3) as the texture source (``None``:
        back to the built-in source)."""
        if textures is None:
            self.textures = None
            return
        t = torch.as_tensor(np.ascontiguousarray(textures) if isinstance(textures, np.ndarray) else textures)
        if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[-1] != 3 or t.shape[0] == 0:
            raise ValueError(f"anomaly textures must be uint8 shaped (N, H, W, 3), got {tuple(t.shape)} {t.dtype}")
        self.textures = t.permute(0, 3, 1, 2).contiguous()

    def _external(self, n: int, height: int, width: int, generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
        assert self.textures is not None
        idx = torch.randint(0, self.textures.shape[0], (n,), generator=generator)
        tex = self.textures[idx].float() / 127.5 - 1.0
        if tex.shape[-2:] != (height, width):
            tex = F.interpolate(tex, size=(height, width), mode="bilinear", align_corners=False)
        return tex.to(device)

    def _from_batch(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        offsets = torch.randint(1, n, (n,), generator=generator)
        source = images[(torch.arange(n) + offsets) % n]
        shifts = torch.stack([torch.randint(0, h, (n,), generator=generator),
                              torch.randint(0, w, (n,), generator=generator)], 1)
        perms = torch.stack([torch.randperm(3, generator=generator) for _ in range(n)])
        invert = torch.rand(n, generator=generator) < 0.5
        out = []
        for i in range(n):
            tex = torch.roll(source[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(-2, -1))
            tex = tex[perms[i].to(images.device)]
            out.append(-tex if bool(invert[i]) else tex)
        return torch.stack(out)

    def _procedural(self, n: int, height: int, width: int, generator: torch.Generator,
                    device: torch.device) -> torch.Tensor:
        out = []
        for _ in range(n):
            a, b = torch.randint(1, 4, (2,), generator=generator).tolist()
            field = (perlin_noise(height, width, 2 ** a, 2 ** b, generator) + 1) / 2
            c1, c2 = _uniform(generator, 2, 3, 1, 1, low=-1.0, high=1.0)
            out.append(c1 * (1 - field) + c2 * field)
        return torch.stack(out).to(device)

    def textures_for(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One texture per image, (N, 3, H, W) in [-1, 1] on the images' device."""
        n, _, h, w = images.shape
        if self.textures is not None:
            tex = self._external(n, h, w, generator, images.device)
        elif n >= 2:
            tex = self._from_batch(images, generator)
        else:
            tex = self._procedural(n, h, w, generator, images.device)
        return _colour_jitter(_flip_rotate(tex, generator), generator)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> SyntheticAnomalies:
        s = self.settings
        n, _, h, w = images.shape
        anomalous = torch.rand(n, generator=generator) < s.anomaly_probability
        masks = torch.zeros(n, 1, h, w)
        chosen = anomalous.nonzero().flatten()
        if len(chosen):
            masks[chosen] = perlin_masks(len(chosen), h, w, s, generator)
        drawn = _uniform(generator, n, high=s.max_opacity)
        beta = torch.where(anomalous, drawn, torch.ones(n))
        texture = self.textures_for(images, generator)
        mask = masks.to(device=images.device, dtype=images.dtype)
        b = beta.to(device=images.device, dtype=images.dtype).view(-1, 1, 1, 1)
        blended = b * images + (1 - b) * texture
        x_a = torch.where(mask > 0, blended, images)
        return SyntheticAnomalies(x_a, mask, texture, beta.to(images.device))
