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

Structural kinds (``diffad.anomaly_kinds``; off by default). DRAEM's
anomalies change colour and surface only; a structural defect bends, shifts or
removes the pattern while its colours stay normal, and a segmenter that never
saw one does not flag it. Inside a mask ``m`` (``structural_mask``: a blob,
the structural-defect set's shape, by default, or the texture kind's Perlin
mask):

- ``warp``: ``x_a(p) = x(p + d(p))``, bicubically, with ``d`` Gaussian-smoothed
  white noise (sigma ``warp_sigma_px``) times the fade window ``w`` (0 at the
  mask's border, 1 a few pixels inside), scaled so that its largest length is
  drawn in ``warp_px``;
- ``patch``: ``x_a = (1 - w) x + w T(x)``, ``T(x)`` the image seen through a
  shift of length in ``patch_shift_px`` (uniform direction), rotated about
  the mask's centroid for a share ``patch_rotation_probability`` of them;
- ``blur``: ``x_a = (1 - w) x + w G_sigma(x)``, sigma drawn in ``blur_sigma_px``.

``w`` is ``m * clamp(2 G_f(m) - 1, 0, 1)**2 / max`` with ``G_f`` a Gaussian blur of
sigma ``feather_px``: 0 outside and on the border, rising to 1 inside (divided
by its maximum, so a thin mask still gets the full edit at its core). The
label of a structural sample is exactly the pixels of ``m`` whose largest
channel change exceeds ``change_threshold`` grey levels, and every other pixel
is reset to ``x`` (the structural-defect set's rule, without its closing and
hole filling): the segmenter is never told a pixel is anomalous that did not
change visibly (a shift along a periodic pattern, a warp of a flat region
change nothing).
A structural sample whose edit changed no pixel enough has an empty mask: it
is a clean sample.

Every random number comes from the given CPU ``torch.Generator``, so a batch's
anomalies are reproducible whatever device the images are on. With the
default kinds (``[texture]``) no draw is added, so the anomalies are those of
the texture-only synthesizer, bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from lotscan.config import DIFFAD_ANOMALY_KINDS, DiffADConfig

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
    (the texture's is ``1 - beta``); 1 for clean samples, which are the image,
    and for structural ones, which blend no texture."""
    kind: torch.Tensor
    """(N,) long: each sample's index in ``SynthesizerSettings.kinds``, -1 for a
    clean sample (one drawn clean; a structural one whose edit changed no pixel
    enough keeps its kind, with an empty mask)."""
    region: torch.Tensor
    """(N, 1, H, W) the mask each sample was drawn with (its Perlin mask, or a
    structural sample's blob); ``mask`` is this for the ``texture`` kind and the
    changed part of it for a structural one."""


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
    kinds: tuple[str, ...] = ("texture",)
    """The config's ``diffad.anomaly_kinds``; the fields below are its
    ``anomaly_*`` fields of the same names (see there for the chosen values)."""
    kind_weights: tuple[float, ...] = ()
    structural_mask: str = "blob"
    blob_radius_px: tuple[float, float] = (4.0, 12.0)
    warp_px: tuple[float, float] = (1.5, 4.0)
    warp_sigma_px: float = 4.0
    patch_shift_px: tuple[float, float] = (2.0, 16.0)
    patch_rotation_probability: float = 0.5
    patch_angle_deg: tuple[float, float] = (30.0, 150.0)
    blur_sigma_px: tuple[float, float] = (1.0, 3.0)
    feather_px: float = 2.0
    change_threshold: float = 10.0
    """Grey levels of 255."""

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        self.kind_weights = tuple(float(w) for w in self.kind_weights)
        unknown = [k for k in self.kinds if k not in DIFFAD_ANOMALY_KINDS]
        if not self.kinds or unknown or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"anomaly kinds must be distinct entries of {', '.join(DIFFAD_ANOMALY_KINDS)}, "
                             f"got {list(self.kinds)}")
        if self.kind_weights and (len(self.kind_weights) != len(self.kinds) or min(self.kind_weights) < 0
                                  or sum(self.kind_weights) <= 0):
            raise ValueError(f"anomaly kind weights {list(self.kind_weights)} must be one weight >= 0 per "
                             f"kind of {list(self.kinds)}, not all 0")
        if self.structural_mask not in ("blob", "perlin"):
            raise ValueError(f"structural anomaly mask must be blob or perlin, got {self.structural_mask!r}")

    @classmethod
    def from_config(cls, cfg: DiffADConfig) -> SynthesizerSettings:
        return cls(cfg.anomaly_probability, cfg.perlin_min_scale_exp, cfg.perlin_max_scale_exp,
                   cfg.perlin_threshold, cfg.max_opacity,
                   kinds=tuple(cfg.anomaly_kinds), kind_weights=tuple(cfg.anomaly_kind_weights),
                   structural_mask=cfg.anomaly_structural_mask, blob_radius_px=tuple(cfg.anomaly_blob_radius_px),
                   warp_px=tuple(cfg.anomaly_warp_px), warp_sigma_px=cfg.anomaly_warp_sigma_px,
                   patch_shift_px=tuple(cfg.anomaly_patch_shift_px),
                   patch_rotation_probability=cfg.anomaly_patch_rotation_probability,
                   patch_angle_deg=tuple(cfg.anomaly_patch_angle_deg),
                   blur_sigma_px=tuple(cfg.anomaly_blur_sigma_px), feather_px=cfg.anomaly_feather_px,
                   change_threshold=cfg.anomaly_change_threshold)


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


def blob_masks(n: int, height: int, width: int, radius_px: tuple[float, float],
               generator: torch.Generator) -> torch.Tensor:
    """``n`` binary blobs (n, 1, H, W) float on CPU, the structural-defect set's
    shape: an ellipse of mean radius drawn in ``radius_px`` (aspect 0.6-1, any
    orientation) whose edge is perturbed by three lobes (k = 2, 3, 4, each of
    relative amplitude up to 0.12), centred where the ellipse's mean radius
    fits inside the image."""
    r = _span(generator, n, radius_px).view(-1, 1, 1)
    aspect = _uniform(generator, n, 1, 1, low=0.6, high=1.0)
    theta = _uniform(generator, n, 1, 1, high=math.pi)
    lobes = _uniform(generator, n, 3, 1, 1, low=-0.12, high=0.12)
    phases = _uniform(generator, n, 3, 1, 1, high=2 * math.pi)
    cy = r + _uniform(generator, n, 1, 1) * (height - 2 * r).clamp_min(0)
    cx = r + _uniform(generator, n, 1, 1) * (width - 2 * r).clamp_min(0)
    ys, xs = _pixel_grid(n, height, width, torch.device("cpu"), torch.float32)
    y, x = ys - cy, xs - cx
    u = x * torch.cos(theta) + y * torch.sin(theta)
    v = (-x * torch.sin(theta) + y * torch.cos(theta)) / aspect
    phi = torch.atan2(v, u).unsqueeze(1)
    k = torch.arange(2, 5, dtype=torch.float32).view(1, 3, 1, 1)
    edge = 1.0 + (lobes * torch.cos(k * phi + phases)).sum(dim=1)
    return (torch.hypot(u, v) < r * edge).float().unsqueeze(1)


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


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """(N, C, H, W) blurred by a separable Gaussian of each sample's own sigma
    (N,) in pixels (or one for all), replicate-padded; a sigma of 0 is the
    identity. One grouped convolution per axis for the whole batch."""
    n, c, h, w = x.shape
    sig = torch.as_tensor(sigma, dtype=torch.float64).flatten().expand(n).clamp_min(1e-6)
    radius = max(1, math.ceil(3.0 * float(sig.max())))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps[None, :] / sig[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    kernel = kernel.to(device=x.device, dtype=x.dtype)
    k = 2 * radius + 1
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kernel.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kernel.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, h, w)


def fade_window(mask: torch.Tensor, feather_px: float) -> torch.Tensor:
    """(N, 1, H, W) weights in [0, 1] that are 0 outside the binary ``mask`` and
    on its border and rise to 1 inside over about two ``feather_px``:
    ``m * clamp(2 G(m) - 1, 0, 1)**2`` (squared, so it leaves the border with
    a small slope: at most about 0.15 on a border pixel of a disc at 2 px),
    divided by each sample's maximum so that a mask thinner than the fade
    still reaches 1 at its core (0 stays 0)."""
    if feather_px <= 0:
        return mask
    window = mask * (2.0 * gaussian_blur(mask, feather_px) - 1.0).clamp(0.0, 1.0) ** 2
    peak = window.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    return torch.where(peak > 0, window / peak.clamp_min(1e-12), window)


def _pixel_grid(n: int, h: int, w: int, device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column coordinates (N, H, W) of the pixel centres."""
    ys = torch.arange(h, device=device, dtype=dtype).view(1, h, 1).expand(n, h, w)
    xs = torch.arange(w, device=device, dtype=dtype).view(1, 1, w).expand(n, h, w)
    return ys, xs


def _sample_at(images: torch.Tensor, sy: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
    """``images`` read bicubically at the pixel coordinates (N, H, W) ``sy``, ``sx``
    (reflected at the borders), clamped to the image range [-1, 1]."""
    h, w = images.shape[-2:]
    grid = torch.stack([(2.0 * sx + 1.0) / w - 1.0, (2.0 * sy + 1.0) / h - 1.0], dim=-1)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="reflection", align_corners=False)
    return out.clamp(-1.0, 1.0)


def _span(generator: torch.Generator, n: int, bounds: tuple[float, float]) -> torch.Tensor:
    return _uniform(generator, n, low=float(bounds[0]), high=float(bounds[1]))


def warp_images(images: torch.Tensor, mask: torch.Tensor, settings: SynthesizerSettings,
                generator: torch.Generator) -> torch.Tensor:
    """The ``warp`` kind before labelling: ``x(p + d(p))`` with a smooth field
    ``d`` that fades to 0 at the mask's border and whose longest vector is drawn
    in ``settings.warp_px`` (pixels)."""
    n, _, h, w = images.shape
    amplitude = _span(generator, n, settings.warp_px).to(images.device, images.dtype)
    noise = torch.randn((n, 2, h, w), generator=generator).to(images.device, images.dtype)
    field = gaussian_blur(noise, settings.warp_sigma_px) * fade_window(mask, settings.feather_px)
    longest = field.norm(dim=1).flatten(1).amax(dim=1).clamp_min(1e-12)
    field = field * (amplitude / longest).view(-1, 1, 1, 1)
    ys, xs = _pixel_grid(n, h, w, images.device, images.dtype)
    return _sample_at(images, ys + field[:, 0], xs + field[:, 1])


def paste_patches(images: torch.Tensor, mask: torch.Tensor, settings: SynthesizerSettings,
                  generator: torch.Generator) -> torch.Tensor:
    """The ``patch`` kind before labelling: inside the mask, feathered in, the
    image as seen from a point shifted by a length in ``settings.patch_shift_px``
    (uniform direction) and, for a share ``patch_rotation_probability``,
    rotated about the mask's centroid by an angle in ``patch_angle_deg`` of
    either sense."""
    n, _, h, w = images.shape
    length = _span(generator, n, settings.patch_shift_px)
    direction = _uniform(generator, n, high=2 * math.pi)
    rotated = torch.rand(n, generator=generator) < settings.patch_rotation_probability
    sense = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    angle = torch.where(rotated, sense * _span(generator, n, settings.patch_angle_deg), torch.zeros(n))
    dev, dt = images.device, images.dtype
    ty, tx = (length * torch.sin(direction)).to(dev, dt), (length * torch.cos(direction)).to(dev, dt)
    theta = torch.deg2rad(angle).to(dev, dt)
    cos, sin = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    ys, xs = _pixel_grid(n, h, w, dev, dt)
    weight = mask[:, 0]
    area = weight.flatten(1).sum(dim=1).clamp_min(1.0).view(-1, 1, 1)
    cy = (ys * weight).flatten(1).sum(dim=1).view(-1, 1, 1) / area
    cx = (xs * weight).flatten(1).sum(dim=1).view(-1, 1, 1) / area
    dy, dx = ys - cy, xs - cx
    sy = cy + cos * dy - sin * dx + ty.view(-1, 1, 1)
    sx = cx + sin * dy + cos * dx + tx.view(-1, 1, 1)
    alpha = fade_window(mask, settings.feather_px)
    return (1 - alpha) * images + alpha * _sample_at(images, sy, sx)


def blur_regions(images: torch.Tensor, mask: torch.Tensor, settings: SynthesizerSettings,
                 generator: torch.Generator) -> torch.Tensor:
    """The ``blur`` kind before labelling: the mask's region feathered into a
    Gaussian blur of the image (sigma drawn in ``settings.blur_sigma_px``): the
    pattern's elements smoothed away, its mean colour kept."""
    sigma = _span(generator, images.shape[0], settings.blur_sigma_px)
    alpha = fade_window(mask, settings.feather_px)
    return (1 - alpha) * images + alpha * gaussian_blur(images, sigma)


STRUCTURAL_CONFIG_FIELDS = (
    "anomaly_kinds", "anomaly_kind_weights", "anomaly_structural_mask", "anomaly_blob_radius_px",
    "anomaly_warp_px", "anomaly_warp_sigma_px", "anomaly_patch_shift_px", "anomaly_patch_rotation_probability",
    "anomaly_patch_angle_deg", "anomaly_blur_sigma_px", "anomaly_feather_px", "anomaly_change_threshold",
)
"""The ``diffad.*`` fields of the structural kinds. They change a stage's
anomalies only where a structural kind is used (:func:`structural_in_use`), and
only then enter its fingerprint: texture-only checkpoints made before these
fields existed keep theirs."""


def structural_in_use(cfg: DiffADConfig, stage: str) -> bool:
    """Whether ``stage``'s synthetic anomalies include a structural kind: the
    segmenter's when ``anomaly_kinds`` is not ``[texture]``, the latent
    denoiser's when, besides, ``structural_condition`` is on."""
    if list(cfg.anomaly_kinds) == ["texture"]:
        return False
    if stage == "segmenter":
        return True
    return stage == "latent_denoiser" and cfg.structural_condition


STRUCTURAL_KINDS = {"warp": warp_images, "patch": paste_patches, "blur": blur_regions}
"""Every kind but ``texture``: ``(images, mask, settings, generator) -> edited
images`` (before labelling); one function per kind, all batched."""
assert set(STRUCTURAL_KINDS) | {"texture"} == set(DIFFAD_ANOMALY_KINDS)


def changed_mask(images: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor,
                 threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_a, label)`` of a structural edit: the label is the pixels of ``mask``
    whose largest channel change exceeds ``threshold`` grey levels (of 255),
    and ``x_a`` is the edit there and the normal image everywhere else."""
    change = (edited - images).abs().amax(dim=1, keepdim=True)
    label = (change > threshold / 127.5) & (mask > 0)
    return torch.where(label, edited, images), label.to(images.dtype)


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

    def __call__(self, images: torch.Tensor, generator: torch.Generator,
                 structural: bool = True) -> SyntheticAnomalies:
        """Synthetic anomalies for ``images`` (N, 3, H, W) in [-1, 1], on their
        device and dtype. ``structural=False`` draws only the ``texture`` kind
        (whatever ``settings.kinds`` says), exactly as a texture-only synthesizer
        does: the latent denoiser's condition with ``diffad.structural_condition``
        off."""
        s = self.settings
        if not structural and s.kinds != ("texture",):
            s = dataclasses.replace(s, kinds=("texture",), kind_weights=())
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
        kind = torch.where(anomalous, self._draw_kinds(s, n, generator), torch.full((n,), -1))
        region = mask.clone()
        for k, name in enumerate(s.kinds):
            idx = (kind == k).nonzero().flatten()
            if name == "texture" or not len(idx):
                continue
            at = idx.to(images.device)
            if s.structural_mask == "blob":
                region[at] = blob_masks(len(idx), h, w, s.blob_radius_px, generator).to(mask.device, mask.dtype)
            edited = STRUCTURAL_KINDS[name](images[at], region[at], s, generator)
            x_a[at], mask[at] = changed_mask(images[at], edited, region[at], s.change_threshold)
            beta[idx] = 1.0
        return SyntheticAnomalies(x_a, mask, texture, beta.to(images.device), kind.to(images.device), region)

    @staticmethod
    def _draw_kinds(s: SynthesizerSettings, n: int, generator: torch.Generator) -> torch.Tensor:
        """Each sample's kind index (N,) long, by ``kind_weights``; with a single
        kind nothing is drawn (so ``[texture]`` draws what it always did)."""
        if len(s.kinds) == 1:
            return torch.zeros(n, dtype=torch.long)
        weights = torch.tensor(s.kind_weights or [1.0] * len(s.kinds), dtype=torch.float64)
        return torch.multinomial(weights, n, replacement=True, generator=generator)
