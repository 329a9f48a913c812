"""DiffAD's structural synthetic anomalies (``diffad.anomaly_kinds``): warp,
patch and blur edits inside a blob or Perlin mask, labelled with the pixels they
changed, and their config wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from lotscan.config import ConfigError, DiffADConfig, from_dict
from lotscan.models.methods.diffad.anomaly import (
    STRUCTURAL_CONFIG_FIELDS,
    AnomalySynthesizer,
    SynthesizerSettings,
    blob_masks,
    blur_regions,
    changed_mask,
    fade_window,
    gaussian_blur,
    paste_patches,
    warp_images,
)
from lotscan.models.registry import build_method

STRUCTURAL = ("warp", "patch", "blur")
GREY = 1 / 127.5
"""One grey level of 255 in the image range [-1, 1]."""


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def texture_images(n: int, size: int = 48, seed: int = 0, width: int | None = None) -> torch.Tensor:
    """Stationary textures with structure at every pixel (sums of random
    gratings of 5-12 px periods, per channel), in [-0.9, 0.9]."""
    g = gen(seed)
    w = width or size
    ys = torch.arange(size, dtype=torch.float64).view(size, 1)
    xs = torch.arange(w, dtype=torch.float64).view(1, w)
    out = torch.zeros(n, 3, size, w, dtype=torch.float64)
    for _ in range(3):
        period = 5 + 7 * torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64)
        angle = math.pi * torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64)
        phase = 2 * math.pi * torch.rand(n, 3, 1, 1, generator=g, dtype=torch.float64)
        out += torch.sin(2 * math.pi * (xs * torch.cos(angle) + ys * torch.sin(angle)) / period + phase)
    return (0.3 * out).float()


def ramp_image(size: int = 48) -> torch.Tensor:
    """(1, 3, S, S): channel 0 is 0.03 * column - 0.7, channel 1 the same of the row,
    so an edit's change in those channels is the displacement it read from."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64),
                            torch.arange(size, dtype=torch.float64), indexing="ij")
    return torch.stack([0.03 * xs - 0.7, 0.03 * ys - 0.7, torch.zeros_like(xs)]).unsqueeze(0)


def disc(size: int, radius: float, centre: tuple[float, float] | None = None) -> torch.Tensor:
    cy, cx = centre or ((size - 1) / 2, (size - 1) / 2)
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64),
                            torch.arange(size, dtype=torch.float64), indexing="ij")
    return (torch.hypot(ys - cy, xs - cx) < radius).to(torch.float64).view(1, 1, size, size)


def settings(**kw) -> SynthesizerSettings:
    return SynthesizerSettings(**kw)


# ------------------------------------------------------------------ building blocks


def test_gaussian_blur_matches_scipy_per_sample():
    x = torch.rand(2, 3, 20, 24, generator=gen(0), dtype=torch.float64)
    sigma = torch.tensor([0.8, 2.5])
    out = gaussian_blur(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        radius = math.ceil(3 * 2.5)  # one kernel width for the batch: the largest sigma's
        ref = ndimage.gaussian_filter(x[i].numpy(), sigma=(0, s, s), mode="nearest", truncate=radius / s)
        assert np.allclose(out[i].numpy(), ref, atol=1e-10)
    assert torch.allclose(gaussian_blur(x, 0.0), x)


def test_fade_window_is_zero_outside_and_on_the_border_and_one_inside():
    mask = disc(40, 12.0)
    w = fade_window(mask, 2.0)
    assert torch.equal(w[mask == 0], torch.zeros(int((mask == 0).sum()), dtype=w.dtype))
    border = (mask > 0) & (torch.nn.functional.max_pool2d(1 - mask, 3, 1, 1) > 0)
    assert w[border].max() < 0.2
    assert w.max() == 1.0 and w[0, 0, 20, 20] > 0.999
    # A sliver thinner than the fade still reaches 1 at its core.
    sliver = torch.zeros(1, 1, 40, 40, dtype=torch.float64)
    sliver[..., 18:21, 5:35] = 1
    ws = fade_window(sliver, 2.0)
    assert ws.max() == 1.0 and torch.equal(ws[sliver == 0], torch.zeros(int((sliver == 0).sum()), dtype=ws.dtype))


def test_blob_masks_are_reproducible_in_range_and_inside():
    a = blob_masks(64, 48, 48, (4.0, 10.0), gen(1))
    assert torch.equal(a, blob_masks(64, 48, 48, (4.0, 10.0), gen(1)))
    assert not torch.equal(a, blob_masks(64, 48, 48, (4.0, 10.0), gen(2)))
    assert a.shape == (64, 1, 48, 48) and set(a.unique().tolist()) == {0.0, 1.0}
    area = a.flatten(1).sum(dim=1)
    # Mean radius 4-10, aspect 0.6-1, lobes up to +-36 % of the radius together.
    assert (area >= math.pi * (4 * 0.64) ** 2 * 0.6).all() and (area <= math.pi * (10 * 1.36) ** 2).all()
    assert area.max() > 2 * area.min()
    fixed = blob_masks(200, 48, 48, (6.0, 6.0), gen(3))
    ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    cy = (fixed[:, 0] * ys).flatten(1).sum(1) / fixed.flatten(1).sum(1)
    cx = (fixed[:, 0] * xs).flatten(1).sum(1) / fixed.flatten(1).sum(1)
    assert cy.min() > 3 and cy.max() < 44 and cx.min() > 3 and cx.max() < 44


# ------------------------------------------------------------------ the edits


def test_warp_moves_content_by_the_drawn_amplitude_and_fades_at_the_border():
    """On a ramp image the change of channels 0 and 1 is the displacement read
    from, to within 0.05 px (PyTorch's bicubic kernel, a = -0.75, reproduces a
    linear image only at whole and half pixels)."""
    x = ramp_image()
    mask = disc(48, 14.0)
    s = settings(warp_px=(3.0, 3.0), warp_sigma_px=4.0, feather_px=2.0)
    edited = warp_images(x, mask, s, gen(0))
    d = (edited - x)[0, :2] / 0.03
    length = d.norm(dim=0)
    assert abs(length.max().item() - 3.0) < 0.06
    assert length[mask[0, 0] == 0].max() < 1e-6  # nothing moves outside the mask
    border = (mask > 0) & (torch.nn.functional.max_pool2d(1 - mask, 3, 1, 1) > 0)
    assert length[border[0, 0]].max() < 0.3 * 3.0  # and little on its border
    assert torch.allclose(edited[0, 2], x[0, 2])
    # The field is smooth: neighbouring displacements differ far less than the amplitude.
    assert (d[:, 1:, :] - d[:, :-1, :]).abs().max() < 1.5 and (d[:, :, 1:] - d[:, :, :-1]).abs().max() < 1.5


def test_patch_pastes_a_shifted_or_rotated_copy_of_the_same_image():
    x = ramp_image()
    mask = disc(48, 10.0)
    core = fade_window(mask, 1.0)[0, 0] == 1.0
    ys, xs = torch.meshgrid(torch.arange(48.0, dtype=torch.float64),
                            torch.arange(48.0, dtype=torch.float64), indexing="ij")
    shifted = paste_patches(x, mask, settings(patch_shift_px=(5.0, 5.0), patch_rotation_probability=0.0,
                                              feather_px=1.0), gen(0))
    d = (shifted - x)[0, :2] / 0.03
    assert torch.allclose(d.norm(dim=0)[core], torch.full((int(core.sum()),), 5.0, dtype=d.dtype), atol=0.06)
    assert d[:, core].std(dim=1).max() < 1e-6  # one offset for the whole patch
    assert (shifted - x)[:, :, mask[0, 0] == 0].abs().max() < 1e-6
    # Rotated by 90 degrees about the centroid (23.5, 23.5), then shifted by 4 px:
    # the source coordinates are a quarter turn of the pixel's about the centroid.
    turned = paste_patches(x, mask, settings(patch_shift_px=(4.0, 4.0), patch_rotation_probability=1.0,
                                             patch_angle_deg=(90.0, 90.0), feather_px=1.0), gen(1))
    sx = (turned[0, 0] + 0.7) / 0.03
    sy = (turned[0, 1] + 0.7) / 0.03
    ry, rx = sy[core] - 23.5, sx[core] - 23.5  # source relative to the centroid, shift included
    py, px = ys[core] - 23.5, xs[core] - 23.5
    # A turn by +-90 degrees maps (py, px) to (-+px, +-py): the rest must be one shift.
    fits = [torch.stack([ry + sense * px, rx - sense * py]) for sense in (1.0, -1.0)]
    shift = min(fits, key=lambda f: float(f.std(dim=1).max()))
    assert shift.std(dim=1).max() < 0.05
    shift_y, shift_x = shift.mean(dim=1).tolist()
    assert abs(math.hypot(float(shift_y), float(shift_x)) - 4.0) < 0.06


def test_blur_smooths_the_pattern_and_keeps_its_mean_colour():
    x = texture_images(1, seed=3).double()
    mask = disc(48, 14.0)
    out = blur_regions(x, mask, settings(blur_sigma_px=(2.5, 2.5), feather_px=1.0), gen(0))
    core = (fade_window(mask, 1.0)[0, 0] == 1.0)
    assert out[0][:, core].std(dim=1).max() < 0.5 * x[0][:, core].std(dim=1).min()
    assert (out[0][:, core].mean(dim=1) - x[0][:, core].mean(dim=1)).abs().max() < 0.1
    assert torch.equal(out[:, :, mask[0, 0] == 0], x[:, :, mask[0, 0] == 0])


def rearrangement_ratio(before: torch.Tensor, after: torch.Tensor) -> float:
    """Wasserstein-1 distance between the per-channel value distributions over the
    mean absolute change: 0 for a pure rearrangement of the values, 1 for any
    monotone tone change (it keeps the order, so sorting matches pixel to pixel)."""
    w1 = (after.sort(dim=1).values - before.sort(dim=1).values).abs().mean()
    return float(w1 / (after - before).abs().mean())


def test_geometric_kinds_move_values_and_keep_the_colour_histogram():
    """Geometric, not photometric: where the edit is at full strength (the core of
    a disc, feather 1 px), a warp and a pasted copy change pixels a lot but leave
    the distribution of values nearly as it was; a blur (photometric: it shrinks
    the histogram) does not."""
    x = texture_images(24, seed=1).double()
    mask = disc(48, 14.0).expand(24, -1, -1, -1).contiguous()
    core = fade_window(mask, 1.0)[:, 0] == 1.0
    s = settings(warp_px=(3.0, 4.0), feather_px=1.0)
    ratios = {}
    for name, edit in (("warp", warp_images), ("patch", paste_patches), ("blur", blur_regions)):
        out = edit(x, mask, s, gen(5))
        assert (out - x)[:, :, core[0]].abs().mean() > 0.1  # content really moved
        ratios[name] = np.median([rearrangement_ratio(x[i][:, core[i]], out[i][:, core[i]]) for i in range(24)])
    tone = x[0][:, core[0]]
    assert abs(rearrangement_ratio(tone, 0.5 * tone ** 3 + 0.8 * tone) - 1.0) < 1e-9
    assert ratios["warp"] < 0.2 and ratios["patch"] < 0.2  # measured 0.13, 0.11
    assert ratios["blur"] > 0.8  # measured 0.95


# ------------------------------------------------------------------ labels


@pytest.mark.parametrize("kind", STRUCTURAL)
@pytest.mark.parametrize("structural_mask", ["blob", "perlin"])
def test_label_is_exactly_the_changed_pixels_of_the_drawn_mask(kind, structural_mask):
    x = texture_images(16, seed=2)
    out = AnomalySynthesizer(settings(anomaly_probability=0.75, kinds=(kind,), structural_mask=structural_mask,
                                      change_threshold=10.0))(x, gen(7))
    change = (out.x_a - x).abs().amax(dim=1, keepdim=True)
    assert torch.equal(out.mask, (change > 10 * GREY).float())  # the label is the changed pixels
    assert (out.mask <= out.region).all()  # and inside the drawn mask
    assert torch.equal(out.x_a[(out.mask == 0).expand_as(x)], x[(out.mask == 0).expand_as(x)])
    anomalous = out.kind >= 0
    assert 0 < int(anomalous.sum()) < 16
    assert (out.mask[~anomalous] == 0).all() and (out.region[~anomalous] == 0).all()
    assert (out.mask[anomalous].flatten(1).sum(dim=1) > 0).float().mean() > 0.8
    assert (out.mask.sum() < out.region.sum())  # some pixels of the regions changed too little
    assert torch.equal(out.beta[anomalous], torch.ones(int(anomalous.sum())))


def test_a_structural_edit_of_a_flat_image_changes_nothing_and_labels_nothing():
    flat = torch.full((6, 3, 32, 32), 0.25)
    for kind in STRUCTURAL:
        out = AnomalySynthesizer(settings(anomaly_probability=1.0, kinds=(kind,)))(flat, gen(0))
        assert (out.region.flatten(1).sum(dim=1) > 0).all()
        assert out.mask.sum() == 0 and torch.allclose(out.x_a, flat, atol=0) and (out.kind == 0).all()


def test_changed_mask_threshold_in_grey_levels():
    x = torch.zeros(1, 3, 2, 2)
    edited = x.clone()
    edited[0, 1, 0, 0] = 11 * GREY  # one channel by 11 levels
    edited[0, :, 0, 1] = 9 * GREY  # every channel by 9
    edited[0, 0, 1, 1] = 50 * GREY  # outside the mask
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    x_a, label = changed_mask(x, edited, mask, 10.0)
    assert label.view(-1).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert torch.equal(x_a[0, :, 0, 0], edited[0, :, 0, 0]) and (x_a.view(3, 4)[:, 1:] == 0).all()


# ------------------------------------------------------------------ the mixture


def test_default_is_texture_only_and_a_zero_weight_kind_is_never_drawn():
    assert SynthesizerSettings.from_config(DiffADConfig()).kinds == ("texture",)
    x = texture_images(12)
    base = AnomalySynthesizer(settings())(x, gen(4))
    assert torch.equal(base.kind, torch.where(base.mask.flatten(1).amax(1) > 0, 0, -1))
    assert torch.equal(base.region, base.mask)
    # Mixing in a kind of weight 0 draws only the kinds (after the texture's draws):
    # the samples are the texture-only ones.
    mixed = AnomalySynthesizer(settings(kinds=("texture", "warp"), kind_weights=(1.0, 0.0)))(x, gen(4))
    for a, b in zip(base[:4], mixed[:4], strict=True):
        assert torch.equal(a, b)
    only_warp = AnomalySynthesizer(settings(kinds=("texture", "warp"), kind_weights=(0.0, 1.0),
                                            anomaly_probability=1.0))(x, gen(4))
    assert (only_warp.kind == 1).all()


def test_every_kind_is_reachable_in_its_share_and_each_is_what_it_says():
    kinds = ("texture", "warp", "patch", "blur")
    synth = AnomalySynthesizer(settings(anomaly_probability=0.8, kinds=kinds, kind_weights=(1.0, 1.0, 1.0, 2.0)))
    x = texture_images(60, size=32, seed=4)
    counts = torch.zeros(5)
    for seed in range(4):
        out = synth(x, gen(seed))
        counts += torch.bincount(out.kind + 1, minlength=5)
        texture = out.kind == 0
        # Texture samples are DRAEM's blend inside their Perlin mask.
        for i in texture.nonzero().flatten().tolist():
            m = out.mask[i, 0] > 0
            expected = out.beta[i] * x[i] + (1 - out.beta[i]) * out.texture[i]
            assert torch.allclose(out.x_a[i][:, m], expected[:, m], atol=1e-6)
        assert (out.beta[out.kind > 0] == 1).all() and (out.beta[texture] < 0.8).all()
    share = counts / counts.sum()
    assert 0.15 < share[0] < 0.25  # clean: 1 - 0.8
    for k, expected in enumerate([0.16, 0.16, 0.16, 0.32], start=1):
        assert abs(share[k] - expected) < 0.06  # 240 samples: 3.5 standard deviations


def test_structural_anomalies_are_reproducible_from_the_generator():
    synth = AnomalySynthesizer(settings(anomaly_probability=1.0, kinds=("texture", "warp", "patch", "blur")))
    x = texture_images(8)
    a, b, c = synth(x, gen(11)), synth(x, gen(11)), synth(x, gen(12))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)
    assert not torch.equal(a.x_a, c.x_a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_devices_and_dtypes(dtype):
    synth = AnomalySynthesizer(settings(anomaly_probability=1.0, kinds=("texture", "warp", "patch", "blur")))
    for n, h, w in ((1, 32, 32), (7, 32, 48)):
        x = texture_images(n, size=h, width=w).to(dtype)
        out = synth(x, gen(0))
        assert out.x_a.shape == x.shape and out.x_a.dtype == dtype and out.x_a.device == x.device
        for t in (out.mask, out.region):
            assert t.shape == (n, 1, h, w) and t.dtype == dtype and t.device == x.device
        assert out.kind.shape == (n,) and out.kind.dtype == torch.long
        assert out.beta.shape == (n,) and out.texture.shape == x.shape
        assert out.x_a.abs().max() <= 1.0
    # The random draws come from the CPU generator only: the global RNG is untouched.
    state = torch.random.get_rng_state()
    synth(texture_images(4), gen(1))
    assert torch.equal(torch.random.get_rng_state(), state)


# ------------------------------------------------------------------ config wiring

NEW_FIELDS = ("anomaly_kinds", "anomaly_kind_weights", "anomaly_structural_mask", "anomaly_blob_radius_px",
              "anomaly_warp_px", "anomaly_warp_sigma_px", "anomaly_patch_shift_px",
              "anomaly_patch_rotation_probability", "anomaly_patch_angle_deg", "anomaly_blur_sigma_px",
              "anomaly_feather_px", "anomaly_change_threshold")


def diffad_cfg(**diffad):
    base = {"autoencoder": {"block_out_channels": [8, 16], "norm_num_groups": 4},
            "latent_denoiser": {"block_out_channels": [16, 32], "norm_num_groups": 8, "layers_per_block": 1},
            "segmenter": {"base_channels": 8, "depth": 2}, "sample_steps": 2, "segmenter_sample_steps": 2}
    base.update(diffad)
    return from_dict({"method": "diffad", "data": {"image_size": 32}, "diffad": base}).validate()


def stage_digests(method) -> dict[str, dict]:
    return {stage: method.stage_settings(stage) for stage in method.stages}


def test_config_reaches_the_synthesizer_and_the_stage_fingerprints():
    cfg = diffad_cfg(anomaly_kinds=["texture", "warp", "patch"], anomaly_kind_weights=[2, 1, 1],
                     anomaly_warp_px=[2, 3], anomaly_structural_mask="perlin", anomaly_change_threshold=5)
    s = SynthesizerSettings.from_config(cfg.diffad)
    assert s.kinds == ("texture", "warp", "patch") and s.kind_weights == (2.0, 1.0, 1.0)
    assert s.warp_px == (2.0, 3.0) and s.structural_mask == "perlin" and s.change_threshold == 5.0
    assert set(STRUCTURAL_CONFIG_FIELDS) == set(NEW_FIELDS)
    torch.manual_seed(0)
    base = build_method(diffad_cfg())
    assert base.synthesizer.settings.kinds == ("texture",)
    # Texture-only: the structural fields act on nothing and stay out of every
    # fingerprint (checkpoints made before they existed keep theirs).
    for settings_ in stage_digests(base).values():
        assert not set(NEW_FIELDS) & set(settings_) and "structural_condition" not in settings_
    assert stage_digests(build_method(diffad_cfg(anomaly_warp_px=[1.0, 2.0], structural_condition=False))) \
        == stage_digests(base)
    mix = {"anomaly_kinds": ["texture", "warp", "patch", "blur"]}
    mixed = build_method(diffad_cfg(**mix))
    for stage in ("latent_denoiser", "segmenter"):  # both train on the synthetic anomalies
        assert set(NEW_FIELDS) <= set(mixed.stage_settings(stage))
        assert mixed.stage_settings(stage) != base.stage_settings(stage)
    assert mixed.stage_settings("autoencoder") == base.stage_settings("autoencoder")
    changed = {"anomaly_kinds": ["texture", "warp"], "anomaly_kind_weights": [1.0, 2.0, 1.0, 1.0],
               "anomaly_structural_mask": "perlin", "anomaly_blob_radius_px": [3.0, 9.0],
               "anomaly_warp_px": [1.0, 2.0], "anomaly_warp_sigma_px": 3.0, "anomaly_patch_shift_px": [1.0, 4.0],
               "anomaly_patch_rotation_probability": 0.2, "anomaly_patch_angle_deg": [10.0, 20.0],
               "anomaly_blur_sigma_px": [0.5, 1.0], "anomaly_feather_px": 1.0, "anomaly_change_threshold": 4.0}
    assert set(changed) == set(NEW_FIELDS)
    for name, value in changed.items():
        other = build_method(diffad_cfg(**{**mix, name: value}))
        for stage in ("latent_denoiser", "segmenter"):
            assert other.stage_settings(stage) != mixed.stage_settings(stage), (name, stage)
        assert other.stage_settings("autoencoder") == base.stage_settings("autoencoder")
    # Structural kinds for the segmenter only: the latent denoiser's stage is the
    # texture-only one, so `--stages segmenter` reuses a texture-only checkpoint.
    seg_only = build_method(diffad_cfg(**mix, structural_condition=False))
    assert seg_only.stage_settings("latent_denoiser") == base.stage_settings("latent_denoiser")
    assert seg_only.stage_settings("segmenter") == mixed.stage_settings("segmenter")


def test_structural_condition_off_trains_the_latent_denoiser_texture_only():
    x = texture_images(6, size=32)
    synth = AnomalySynthesizer(settings(anomaly_probability=1.0, kinds=("texture", "warp")))
    texture_only = AnomalySynthesizer(settings(anomaly_probability=1.0))(x, gen(2))
    for a, b in zip(synth(x, gen(2), structural=False)[:5], texture_only[:5], strict=True):
        assert torch.equal(a, b)
    losses = {}
    for name, extra in (("texture", {}), ("off", {"structural_condition": False}), ("on", {})):
        kinds = {} if name == "texture" else {"anomaly_kinds": ["warp"]}
        torch.manual_seed(0)
        method = build_method(diffad_cfg(anomaly_probability=1.0, **kinds, **extra))
        losses[name] = float(method.training_loss("latent_denoiser", method.networks, x, gen(3)).detach())
    assert losses["off"] == losses["texture"]
    assert losses["on"] != losses["texture"]


@pytest.mark.parametrize("override, key", [
    ({"anomaly_kinds": ["texture", "bend"]}, "diffad.anomaly_kinds"),
    ({"anomaly_kinds": []}, "diffad.anomaly_kinds"),
    ({"anomaly_kinds": ["warp", "warp"]}, "diffad.anomaly_kinds"),
    ({"anomaly_kinds": ["texture", "warp"], "anomaly_kind_weights": [1.0]}, "diffad.anomaly_kind_weights"),
    ({"anomaly_kind_weights": [0.0]}, "diffad.anomaly_kind_weights"),
    ({"anomaly_warp_px": [4.0, 2.0]}, "diffad.anomaly_warp_px"),
    ({"anomaly_patch_shift_px": [1.0]}, "diffad.anomaly_patch_shift_px"),
    ({"anomaly_patch_angle_deg": [30.0, 200.0]}, "diffad.anomaly_patch_angle_deg"),
    ({"anomaly_patch_rotation_probability": 1.5}, "diffad.anomaly_patch_rotation_probability"),
    ({"anomaly_blob_radius_px": [20.0, 30.0]}, "diffad.anomaly_blob_radius_px"),
    ({"anomaly_structural_mask": "disc"}, "diffad.anomaly_structural_mask"),
    ({"anomaly_warp_sigma_px": 0.0}, "diffad.anomaly_warp_sigma_px"),
    ({"anomaly_blur_sigma_px": [0.0, 0.0]}, "diffad.anomaly_blur_sigma_px"),
    ({"anomaly_feather_px": -1.0}, "diffad.anomaly_feather_px"),
    ({"anomaly_change_threshold": 300.0}, "diffad.anomaly_change_threshold"),
])
def test_bad_anomaly_settings_name_their_field(override, key):
    with pytest.raises(ConfigError, match=key):
        diffad_cfg(**override)


def test_segmenter_trains_on_the_structural_mix():
    torch.manual_seed(0)
    method = build_method(diffad_cfg(anomaly_kinds=["texture", "warp", "patch", "blur"], anomaly_probability=1.0,
                                     segmenter_refresh_fraction=1.0))
    x = texture_images(4, size=32)
    batch = method.segmenter_batch(x, gen(0))
    assert batch["mask"].shape == (4, 1, 32, 32) and batch["mask"].sum() > 0
    loss = method.training_loss("segmenter", method.networks, x, gen(0))
    assert torch.isfinite(loss) and loss > 0
