"""DiffAD: networks, synthetic anomalies, focal loss, training stages, the
segmenter sample cache, unit-wise scoring and bundle round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lotscan.config import ConfigError, from_dict, load_config
from lotscan.models.bundle import Bundle, bundle_files, load_bundle
from lotscan.models.diffusion import NoiseSchedule
from lotscan.models.methods.diffad import DiffADMethod
from lotscan.models.methods.diffad.anomaly import (
    AnomalySynthesizer,
    SynthesizerSettings,
    perlin_noise,
    rotate_images,
    rotate_normal_images,
)
from lotscan.models.methods.diffad.loss import focal_loss
from lotscan.models.methods.diffad.method import SampleCache
from lotscan.models.reduction import combine_partials
from lotscan.models.registry import build_method
from lotscan.models.scoring import Calibration, Scorer, mean_filter


@pytest.fixture(autouse=True)
def one_thread():
    """The networks here are tiny: one intra-op thread is faster than two, and far
    faster when the cores are busy with other work (threads wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(**diffad):
    base = {
        "autoencoder": {"block_out_channels": [8, 16], "norm_num_groups": 4},
        "latent_denoiser": {"block_out_channels": [16, 32], "norm_num_groups": 8, "layers_per_block": 1},
        "segmenter": {"base_channels": 8, "depth": 2},
        "sample_steps": 2,
        "segmenter_sample_steps": 2,
    }
    for key, value in diffad.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return from_dict({"method": "diffad", "data": {"image_size": 32}, "diffad": base}).validate()


def tiny_method(**diffad) -> DiffADMethod:
    torch.manual_seed(0)
    method = build_method(tiny_cfg(**diffad))
    assert isinstance(method, DiffADMethod)
    return method


def images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 3, size, size), generator=g) * 2 - 1


def set_stage(method: DiffADMethod, stage: str) -> None:
    """As the training loop does, but leave requires_grad on everywhere so that a
    gradient leaking into a frozen network would show."""
    for name, net in method.networks.items():
        net.train(name == stage).requires_grad_(True)
        net.zero_grad(set_to_none=True)


# ------------------------------------------------------------------ networks


@pytest.mark.parametrize("channels, side", [([8, 16], 16), ([8, 16, 16], 8)])
def test_autoencoder_latent_size_follows_block_count(channels, side):
    method = tiny_method(autoencoder={"block_out_channels": channels},
                         latent_denoiser={"block_out_channels": [16]})
    ae = method.networks["autoencoder"]
    x = images(2)
    posterior = ae.encode(x).latent_dist
    assert posterior.mean.shape == (2, 4, side, side)
    assert ae.decode(posterior.mean).sample.shape == x.shape


def test_latent_denoiser_and_segmenter_shapes():
    method = tiny_method()
    den = method.networks["latent_denoiser"]
    z = torch.randn(3, 4, 16, 16)
    assert den(z, torch.tensor([0, 10, 999]), torch.randn(3, 4, 16, 16)).shape == (3, 4, 16, 16)
    assert den.config["in_channels"] == 8 and den.config["out_channels"] == 4
    assert set(den.state_dict()) >= {"latent_mean", "latent_std"}
    seg = method.networks["segmenter"]
    assert seg.config["in_channels"] == 9
    assert seg(torch.randn(2, 9, 32, 32)).shape == (2, 2, 32, 32)
    seg6 = tiny_method(interpolated_channels=False).networks["segmenter"]
    assert seg6.config["in_channels"] == 6
    assert seg6(torch.randn(2, 6, 32, 32)).shape == (2, 2, 32, 32)
    with pytest.raises(RuntimeError):
        seg6(torch.randn(2, 9, 32, 32))


# ------------------------------------------------------- synthetic anomalies


def synthesizer(**settings) -> AnomalySynthesizer:
    return AnomalySynthesizer(SynthesizerSettings(**settings))


def test_perlin_noise_range_and_zero_at_lattice_points():
    g = torch.Generator().manual_seed(0)
    noise = perlin_noise(32, 32, 4, 2, g)
    assert noise.shape == (32, 32)
    assert noise.abs().max() <= 1.0 and noise.std() > 0.1
    # Gradient noise vanishes on the lattice corners (every 8 rows, 16 columns).
    assert noise[::8, ::16].abs().max() < 1e-6


def test_synthesizer_is_seeded_and_keeps_outside_the_mask():
    synth = synthesizer()
    x = images(8)
    a = synth(x, torch.Generator().manual_seed(3))
    b = synth(x, torch.Generator().manual_seed(3))
    c = synth(x, torch.Generator().manual_seed(4))
    assert torch.equal(a.x_a, b.x_a) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)
    assert a.mask.shape == (8, 1, 32, 32)
    assert set(a.mask.unique().tolist()) <= {0.0, 1.0}
    outside = (a.mask == 0).expand_as(x)
    assert torch.equal(a.x_a[outside], x[outside])
    inside = ~outside
    assert inside.any()
    # Inside the mask the texture weighs 1 - beta in (0.2, 1] (DRAEM's blend).
    gap = (a.texture - x).abs()
    assert ((a.x_a - x).abs()[inside] <= gap[inside] + 1e-6).all()
    assert ((a.x_a - x).abs()[inside] >= 0.2 * gap[inside] - 1e-6).all()
    anomalous = a.mask.flatten(1).amax(dim=1) > 0
    assert ((a.beta[anomalous] >= 0) & (a.beta[anomalous] < 0.8)).all()
    assert torch.equal(a.beta[~anomalous], torch.ones(int((~anomalous).sum())))


def test_anomaly_share_and_mask_coverage():
    # Measured with the defaults at 32 px: about 5% of the image covered on
    # average per anomalous sample (10%/50%/90% quantiles about 1.7/3.6/8%).
    synth = synthesizer(anomaly_probability=0.5)
    g = torch.Generator().manual_seed(0)
    cover = []
    for seed in range(4):
        out = synth(images(48, seed), g)
        cover.append(out.mask.flatten(1).mean(dim=1))
    cover = torch.cat(cover)
    anomalous = cover > 0
    assert 0.38 < anomalous.float().mean().item() < 0.62
    assert 0.02 < cover[anomalous].mean().item() < 0.12
    none = synthesizer(anomaly_probability=0.0)(images(16), g)
    assert none.mask.sum() == 0 and torch.equal(none.x_a, images(16))
    every = synthesizer(anomaly_probability=1.0)(images(16), g)
    assert (every.mask.flatten(1).sum(dim=1) > 0).all()


def test_given_textures_are_pasted_inside_the_mask():
    synth = synthesizer(anomaly_probability=1.0)
    colour = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    colour[...] = (255, 0, 128)
    synth.set_textures(colour)
    x = images(6)
    out = synth(x, torch.Generator().manual_seed(1))
    for i in range(6):
        tex = out.texture[i].flatten(1)
        # Flips, rotations and colour jitter keep a constant texture constant.
        assert (tex.max(dim=1).values - tex.min(dim=1).values).max() < 1e-6
        m = out.mask[i, 0] > 0
        beta = out.beta[i]
        expected = beta * x[i] + (1 - beta) * out.texture[i]
        assert torch.allclose(out.x_a[i][:, m], expected[:, m], atol=1e-6)
    # The built-in source (other images of the batch) is not constant.
    synth.set_textures(None)
    builtin = synth(x, torch.Generator().manual_seed(1)).texture
    assert builtin.flatten(2).std(dim=2).min() > 0.1
    # A batch of one gets a procedural texture.
    single = synth(x[:1], torch.Generator().manual_seed(1))
    assert single.texture.shape == (1, 3, 32, 32) and single.mask.sum() > 0


def test_texture_weighs_one_minus_beta_in_draems_range():
    """DRAEM's and DiffAD's code: inside the mask x_a = beta * x + (1 - beta) * texture
    with beta uniform in [0, 0.8), so the texture weighs (0.2, 1] (it weighed
    [0, 0.8) before: some "anomalies" were nearly invisible)."""
    synth = synthesizer(anomaly_probability=1.0)
    white = np.full((1, 32, 32, 3), 255, dtype=np.uint8)
    synth.set_textures(white)
    x = torch.full((64, 3, 32, 32), -1.0)
    out = synth(x, torch.Generator().manual_seed(0))
    weights = []
    for i in range(64):
        m = out.mask[i, 0] > 0
        assert m.any()
        tex = out.texture[i][:, m]
        assert (tex - x[i][:, m]).min() > 0.5  # the jittered white stays far from black
        w = (out.x_a[i][:, m] - x[i][:, m]) / (tex - x[i][:, m])
        assert torch.allclose(w, torch.full_like(w, float(1 - out.beta[i])), atol=1e-5)
        weights.append(float(w.mean()))
    weights = torch.tensor(weights)
    assert (weights > 0.2).all() and (weights <= 1.0 + 1e-6).all()
    assert weights.min() < 0.3 and weights.max() > 0.9  # the whole (0.2, 1] range is used


def test_rotation_of_normal_images():
    x = images(3)
    quarter = rotate_images(x, torch.full((3,), 90.0))
    assert torch.allclose(quarter, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-4)
    flat = torch.full((1, 3, 32, 32), 0.5)
    turned = rotate_images(flat, torch.tensor([45.0]))
    assert torch.allclose(turned[..., 12:20, 12:20], flat[..., 12:20, 12:20], atol=1e-5)
    assert torch.allclose(turned[..., 0, 0], torch.full((1, 3), -1.0))  # black corners, as imgaug's
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert rotate_normal_images(x, 0.0, g) is x and torch.equal(g.get_state(), state)
    many = images(400, seed=1)
    rotated = rotate_normal_images(many, 0.3, g)
    changed = (rotated - many).flatten(1).abs().amax(dim=1) > 1e-3
    assert 0.22 < changed.float().mean().item() < 0.38
    # Every stage trains on the rotated images.
    method = tiny_method(normal_rotation_probability=1.0)
    seen = []
    method._autoencoder_loss = lambda net, imgs, gen: seen.append(imgs) or torch.zeros(())
    batch = images(4)
    method.training_loss("autoencoder", {"autoencoder": None}, batch, torch.Generator().manual_seed(1))
    assert not torch.allclose(seen[0], batch)
    assert tiny_method().cfg.diffad.normal_rotation_probability == 0.0


def test_texture_resources_reach_the_synthesizer():
    method = tiny_method(anomaly_source_uri="s3://bucket/dtd/")
    assert method.training_resource_uris() == {"anomaly_textures": "s3://bucket/dtd/"}
    assert tiny_method().training_resource_uris() == {}
    method.set_training_resources({"anomaly_textures": np.zeros((2, 32, 32, 3), dtype=np.uint8)})
    assert method.synthesizer.textures is not None and method.synthesizer.textures.shape == (2, 3, 32, 32)


# ----------------------------------------------------------------- focal loss


def test_focal_loss_by_hand_and_cross_entropy_at_gamma_zero():
    logits = torch.tensor([[2.0, 0.0], [0.5, -1.0], [0.0, 3.0]]).T.reshape(1, 2, 1, 3)
    mask = torch.tensor([0.0, 1.0, 1.0]).reshape(1, 1, 1, 3)
    expected = []
    for (l0, l1), y in zip([(2.0, 0.0), (0.5, -1.0), (0.0, 3.0)], [0, 1, 1], strict=True):
        p1 = math.exp(l1) / (math.exp(l0) + math.exp(l1))
        pt = p1 if y == 1 else 1 - p1
        expected.append(-((1 - pt) ** 2) * math.log(pt))
    assert focal_loss(logits, mask, 2.0).item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn((2, 2, 5, 5), generator=g)
    mask = (torch.rand((2, 1, 5, 5), generator=g) > 0.7).float()
    ce = F.cross_entropy(logits, mask[:, 0].long())
    assert focal_loss(logits, mask, 0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    assert focal_loss(logits, mask, 2.0) < ce


# ------------------------------------------------------------------ training


@pytest.mark.parametrize("stage", ["autoencoder", "latent_denoiser", "segmenter"])
def test_stage_loss_trains_only_its_network(stage):
    method = tiny_method()
    set_stage(method, stage)
    assert method.stage_networks(stage) == [stage]
    loss = method.training_loss(stage, {stage: method.networks[stage]}, images(4),
                                torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for name, net in method.networks.items():
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        if name == stage:
            assert grads and any(g.abs().sum() > 0 for g in grads)
        else:
            assert not grads, f"{stage} loss reached {name}"


def test_latent_schedule_is_the_official_one_and_the_others_are_unchanged():
    """DiffAD's configs/mvtec.yaml: linear_start 0.0015, linear_end 0.02 on LDM's
    'linear' (linear in sqrt(beta)) schedule: alpha_bar(250) = 0.505, not the
    0.820 of diffusers' default range."""
    method = tiny_method()
    betas = np.linspace(0.0015 ** 0.5, 0.02 ** 0.5, 1000, dtype=np.float64) ** 2
    reference = np.cumprod(1 - betas)
    t = torch.tensor([0, 100, 250, 999])
    got = method.schedule.alpha_bar(t, torch.zeros(4, 1)).view(-1).double().numpy()
    np.testing.assert_allclose(got, reference[t.numpy()], rtol=1e-4)
    assert got[2] == pytest.approx(0.505, abs=0.002)
    # The pixel-space denoisers keep DDPM's linear 1e-4..0.02 (recon, dta, drdc).
    cfg = from_dict({}).validate()
    linear = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    for section in (cfg.denoiser, cfg.drdc.inpainter):
        assert (section.beta_start, section.beta_end) == (1e-4, 0.02)
        np.testing.assert_allclose(NoiseSchedule.from_config(section).alphas_cumprod.numpy(), linear, rtol=1e-4)
    # Every schedule reads its range; an impossible one is refused.
    other = load_config(overrides=["denoiser.beta_start=0.001"]).denoiser
    expected = np.cumprod(1 - np.linspace(0.001, 0.02, 1000, dtype=np.float64))
    np.testing.assert_allclose(NoiseSchedule.from_config(other).alphas_cumprod.numpy(), expected, rtol=1e-4)
    with pytest.raises(ConfigError, match=r"diffad\.latent_denoiser\.beta_start/beta_end"):
        load_config(overrides=["diffad.latent_denoiser.beta_start=0.05"])


def test_the_latent_denoiser_carries_the_beta_range_it_was_trained_with():
    method = tiny_method()
    den = method.networks["latent_denoiser"]
    assert "beta_range" in den.state_dict()
    assert den.beta_range.tolist() == [0.0015, 0.02]
    files = bundle_files(Bundle(method=method, calibration=None))
    loaded = load_bundle(files.__getitem__, "memory", require_calibration=False).method
    assert loaded.schedule.alpha_bar(torch.tensor([250]), torch.zeros(1, 1)).item() == pytest.approx(0.505, abs=2e-3)
    old = tiny_method()
    old.networks["latent_denoiser"].beta_range.copy_(torch.tensor([1e-4, 0.02], dtype=torch.float64))  # trained before the fix
    with pytest.raises(ValueError, match="trained with 0.0001..0.02"):
        _ = old.schedule


def test_latent_statistics_follow_the_batches():
    method = tiny_method()
    set_stage(method, "latent_denoiser")
    den = method.networks["latent_denoiser"]
    assert torch.equal(den.latent_mean, torch.zeros(4)) and torch.equal(den.latent_std, torch.ones(4))
    ae = method.networks["autoencoder"]

    def batch_stats(x):
        with torch.no_grad():
            z = ae.encode(x).latent_dist.mean
        return z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3), unbiased=False)

    g = torch.Generator().manual_seed(0)
    x1, x2 = images(4, 1) * 0.5 + 0.3, images(4, 2) * 0.5 - 0.3
    method.training_loss("latent_denoiser", {"latent_denoiser": den}, x1, g)
    m1, s1 = batch_stats(x1)
    assert torch.allclose(den.latent_mean, m1, atol=1e-5) and torch.allclose(den.latent_std, s1, atol=1e-5)
    method.training_loss("latent_denoiser", {"latent_denoiser": den}, x2, g)
    m2, s2 = batch_stats(x2)
    assert torch.allclose(den.latent_mean, (m1 + m2) / 2, atol=1e-5)
    assert torch.allclose(den.latent_std, (s1 + s2) / 2, atol=1e-5)
    assert int(den.num_batches_tracked) == 2


def test_clean_and_noisy_condition_losses_differ():
    x, losses = images(4), []
    for mode in ("noisy", "clean"):
        method = tiny_method(condition_noise=mode)
        set_stage(method, "latent_denoiser")
        losses.append(method.training_loss("latent_denoiser", {"latent_denoiser": method.networks["latent_denoiser"]},
                                           x, torch.Generator().manual_seed(0)).item())
    assert losses[0] != losses[1]


def test_segmenter_refreshes_only_a_share_once_the_cache_is_full():
    method = tiny_method(segmenter_refresh_fraction=0.25, segmenter_cache_size=8)
    set_stage(method, "segmenter")
    sampled = []
    original = method.reconstruct

    def counting(c, z_T, c_noise, steps):
        sampled.append(c.shape[0])
        return original(c, z_T, c_noise, steps)

    method.reconstruct = counting
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        batch = method.segmenter_batch(images(4, step), g)
        assert {k: v.shape[0] for k, v in batch.items()} == {"x_a": 4, "mask": 4, "x_inter": 4, "x_r": 4}
    # Two full batches fill the 8-sample cache; then 1 of every 4 is new.
    assert sampled == [4, 4, 1, 1]
    assert len(method.segmenter_cache) == 8
    # A cache smaller than the draw gives what it holds.
    small = tiny_method(segmenter_refresh_fraction=0.25, segmenter_cache_size=2)
    small.reconstruct = counting
    sampled.clear()
    for step in range(2):
        small.segmenter_batch(images(4, step), g)
    assert sampled == [4, 2]


@pytest.mark.parametrize("setting, expected", [(None, True), (False, False), (True, True)])
def test_cache_flips_follow_the_setting_or_the_method_default(setting, expected):
    method = tiny_method(segmenter_refresh_fraction=0.25, segmenter_cache_size=4)
    method.cfg.train.augment_flips = setting
    seen = []
    original = method.segmenter_cache.draw

    def spy(k, generator, flips, device, dtype):
        seen.append(flips)
        return original(k, generator, flips, device, dtype)

    method.segmenter_cache.draw = spy
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        method.segmenter_batch(images(4, step), g)
    assert seen == [expected]
    assert DiffADMethod.default_augment_flips is True


def test_cached_samples_are_flipped_consistently():
    cache = SampleCache(16)
    g = torch.Generator().manual_seed(0)
    x_a = torch.rand((16, 3, 8, 8), generator=g) * 2 - 1
    mask = (x_a[:, :1] > 0).float()
    cache.add({"x_a": x_a, "mask": mask, "x_r": x_a * 0.5})
    drawn = cache.draw(16, g, flips=True, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.equal(drawn["mask"], (drawn["x_a"][:, :1] > 0).float())
    assert torch.allclose(drawn["x_r"], drawn["x_a"] * 0.5, atol=1e-3)
    stored = {tuple(v.flatten().tolist()) for v in x_a.half().float()}
    as_is = sum(tuple(v.flatten().tolist()) in stored for v in drawn["x_a"])
    assert as_is < 16  # some were flipped, so a repeat is a different input


def test_stage_settings_hold_only_what_each_stage_depends_on():
    method = tiny_method()
    ae = method.stage_settings("autoencoder")
    assert set(ae) == {"autoencoder", "image_size", "normal_rotation_probability"}
    ld = method.stage_settings("latent_denoiser")
    assert {"latent_denoiser", "condition_noise", "perlin_threshold", "anomaly_probability",
            "anomaly_source_uri", "max_opacity"} <= set(ld)
    assert "segmenter" not in ld and "autoencoder" not in ld
    seg = method.stage_settings("segmenter")
    assert {"segmenter", "segmenter_sample_steps", "sample_condition_level", "interpolated_channels",
            "interpolation_lambda", "segmenter_refresh_fraction", "segmenter_cache_size",
            "max_opacity", "perlin_max_scale_exp", "normal_rotation_probability"} <= set(seg)
    for stage in method.stages:  # the rotation changes what every stage trains on
        assert tiny_method(normal_rotation_probability=0.3).stage_settings(stage) != method.stage_settings(stage)
    # Scoring-only settings do not invalidate a trained stage.
    other = tiny_method(sample_steps=7, num_samples=3)
    for stage in method.stages:
        assert other.stage_settings(stage) == method.stage_settings(stage)
    assert tiny_method(segmenter_refresh_fraction=0.5).stage_settings("segmenter") != seg
    with pytest.raises(ValueError):
        method.stage_settings("denoiser")


# ------------------------------------------------------------------- scoring


def scoring_method(**diffad) -> DiffADMethod:
    method = tiny_method(**diffad)
    den = method.networks["latent_denoiser"]
    den.latent_mean.fill_(0.1)
    den.latent_std.fill_(0.7)
    return method.eval()


def test_unit_split_and_batch_composition_do_not_change_a_map():
    method = scoring_method(num_samples=2, sample_condition_level=50)
    x, seeds = images(2), [11, 12]
    whole = method.partial(x, seeds, [0, 1])
    assert whole["mask_sum"].shape == (2, 32, 32) and torch.equal(whole["count"], torch.tensor([2.0, 2.0]))
    split = combine_partials([method.partial(x, seeds, [0]), method.partial(x, seeds, [1])])
    a, b = method.finalize(whole)["segmentation"], method.finalize(split)["segmentation"]
    assert torch.allclose(a, b, atol=1e-5)
    assert ((a >= 0) & (a <= 1)).all()
    alone = method.finalize(method.partial(x[1:], seeds[1:], [0, 1]))["segmentation"]
    assert torch.allclose(alone[0], a[1], atol=1e-5)
    assert torch.equal(method.fuse({"segmentation": a}), a)


def test_different_seeds_and_units_give_different_samples():
    method = scoring_method()
    x = images(1).repeat(2, 1, 1, 1)
    c = method.condition(x)
    from lotscan.models.method import unit_noise

    noise = unit_noise([1, 2], 0, tuple(c.shape[1:]), "cpu")
    with torch.no_grad():
        x_r, x_inter = method.reconstruct(c, noise, None, 2)
    assert not torch.allclose(x_r[0], x_r[1])
    assert x_inter is not None and not torch.allclose(x_inter[0], x_r[0])
    maps = method.partial(x, [1, 2], [0])["mask_sum"]
    assert not torch.allclose(maps[0], maps[1])
    unit0, unit1 = method.partial(x[:1], [1], [0])["mask_sum"], method.partial(x[:1], [1], [1])["mask_sum"]
    assert not torch.allclose(unit0, unit1)


def test_segmentation_is_scored_raw_unless_a_kernel_is_set():
    """The official code scores pixels on the raw softmax: DiffAD's default kernel
    is 1. A kernel in the config (e.g. a bundle that stored 5) still applies."""
    method = scoring_method()
    assert method.cfg.score.smoothing_kernel is None and DiffADMethod.default_smoothing_kernel == 1
    x, seeds = images(2), [1, 2]
    partial = method.partial(x, seeds, [0])
    raw = method.finalize(partial)["segmentation"]
    assert torch.equal(Scorer(method).signals_from_partial(partial)["segmentation"], raw)
    method.cfg.score.smoothing_kernel = 5
    files = bundle_files(Bundle(method=method, calibration=Calibration({"segmentation": [0.0, 1.0]}, 0.5, 0.01, 2)))
    loaded = load_bundle(files.__getitem__, "memory").method.eval()
    assert loaded.cfg.score.smoothing_kernel == 5
    smoothed = Scorer(loaded).signals_from_partial(partial)["segmentation"]
    assert torch.allclose(smoothed, mean_filter(raw, 5)) and not torch.allclose(smoothed, raw)


def test_scoring_without_interpolated_channels():
    method = scoring_method(interpolated_channels=False)
    assert method.networks["segmenter"].config["in_channels"] == 6
    out = method.finalize(method.partial(images(2), [1, 2], [0]))["segmentation"]
    assert out.shape == (2, 32, 32) and torch.isfinite(out).all()


def test_bundle_round_trip_keeps_latent_statistics():
    method = scoring_method(num_samples=2)
    files = bundle_files(Bundle(method=method, calibration=None))
    loaded = load_bundle(files.__getitem__, "memory", require_calibration=False).method
    den = loaded.networks["latent_denoiser"]
    assert torch.allclose(den.latent_mean, torch.full((4,), 0.1))
    assert torch.allclose(den.latent_std, torch.full((4,), 0.7))
    loaded.eval()
    x, seeds = images(2), [5, 6]
    a, b = method.partial(x, seeds, [0, 1]), loaded.partial(x, seeds, [0, 1])
    assert torch.equal(a["mask_sum"], b["mask_sum"])
    import json

    manifest = json.loads(files["bundle.json"])
    assert manifest["networks"]["latent_denoiser"]["config"]["in_channels"] == 8
    assert manifest["networks"]["segmenter"]["config"]["in_channels"] == 9
