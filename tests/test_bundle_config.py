"""Config parsing and validation, model bundle round trip, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lotscan.config import ConfigError, load_config
from lotscan.models.bundle import Bundle, BundleError, content_model_id
from lotscan.models.registry import build_method
from lotscan.models.scoring import Calibration, Scorer
from lotscan.platform.bundles import open_bundle, save_bundle
from lotscan.platform.checkpoints import load_checkpoint, save_checkpoint

TINY = ["data.image_size=16", "denoiser.block_out_channels=[8, 16]", "dta.num_levels=3"]


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: recon\ntrain:\n  max_steps: 7\n  learning_rate: 1e-3\n")
    cfg = load_config(path, ["train.max_steps=9", "denoiser.block_out_channels=[8,16]"])
    assert cfg.method == "recon"
    assert cfg.train.max_steps == 9
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.denoiser.block_out_channels == [8, 16]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
        ("train.max_steps=many", "train.max_steps: expected an integer"),
        ("method=magic", "method: must be one of"),
        ("dta.max_noise_level=5000", "dta.max_noise_level"),
        ("score.smoothing_kernel=4", "score.smoothing_kernel"),
        ("denoiser.norm_num_groups=7", "denoiser.norm_num_groups"),
        ("nonsense", "expected section.key=value"),
    ],
)
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(overrides=[override])


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def _bundle() -> Bundle:
    torch.manual_seed(0)
    cfg = load_config(overrides=TINY)
    method = build_method(cfg)
    calibration = Calibration({"trend_x": [0.1, 0.5], "trend_u": [0.0, 2.0]}, 0.7, 0.01, 4)
    return Bundle(method=method, calibration=calibration, training={"steps": 3})


def test_bundle_round_trip_scores_identically(tmp_path):
    bundle = _bundle()
    model_id = save_bundle(bundle, str(tmp_path / "b"), bundle.config.storage)
    manifest = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert manifest["method"] == "dta" and manifest["model_id"] == model_id
    assert (tmp_path / "b" / "denoiser.safetensors").exists()
    assert manifest["networks"]["denoiser"]["config"]["block_out_channels"] == [8, 16]
    loaded = open_bundle(str(tmp_path / "b"), bundle.config.storage)
    assert loaded.model_id == model_id
    assert loaded.calibration == bundle.calibration
    images = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    a = Scorer(bundle.method, bundle.calibration).score(images, [1, 2])
    b = Scorer(loaded.method, loaded.calibration).score(images, [1, 2])
    np.testing.assert_array_equal(a.anomaly_maps, b.anomaly_maps)


def test_bundle_errors(tmp_path):
    storage = load_config().storage
    with pytest.raises(BundleError, match="no model bundle here"):
        open_bundle(str(tmp_path / "none"), storage)
    bundle = _bundle()
    where = str(tmp_path / "b")
    save_bundle(bundle, where, storage)
    # A bundle cannot be re-pointed at another architecture.
    with pytest.raises(BundleError, match="denoiser.layers_per_block cannot change"):
        open_bundle(where, storage, overrides={"denoiser": {"layers_per_block": 3}})
    # Nor a setting its calibration depends on.
    with pytest.raises(BundleError, match="dta.num_levels cannot change"):
        open_bundle(where, storage, overrides={"dta": {"num_levels": 5}})
    with pytest.raises(BundleError, match="method cannot change"):
        open_bundle(where, storage, overrides={"method": "recon"})
    # The same value as stored is fine (a training config file reused for scoring).
    assert open_bundle(where, storage, overrides={"dta": {"num_levels": 3}}).config.dta.num_levels == 3
    # Storage is never taken from the bundle.
    manifest = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert manifest["config"]["storage"]["endpoint_url"] is None
    # Scoring settings may change.
    assert open_bundle(where, storage, overrides={"score": {"batch_size": 3}}).config.score.batch_size == 3
    # Weights that do not match their checksum are refused.
    (tmp_path / "b" / "denoiser.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(BundleError, match="checksum"):
        open_bundle(where, storage)
    (tmp_path / "b" / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(where, storage)


def test_bundle_with_mismatched_weights_is_refused(tmp_path):
    storage = load_config().storage
    bundle = _bundle()
    where = tmp_path / "b"
    save_bundle(bundle, str(where), storage)
    manifest = json.loads((where / "bundle.json").read_text())
    manifest["config"]["denoiser"]["block_out_channels"] = [8, 8]
    (where / "bundle.json").write_text(json.dumps(manifest))
    # An edited config no longer matches the model id ...
    with pytest.raises(BundleError, match="does not match the content"):
        open_bundle(str(where), storage)
    # ... and with the id recomputed, the weights no longer fit the network.
    manifest["model_id"] = content_model_id(manifest)
    (where / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not fit the denoiser"):
        open_bundle(str(where), storage)


def test_checkpoint_round_trip_restores_optimizer(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    save_checkpoint(str(tmp_path), {"net": net}, opt, {"step": 3})
    net2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-2)
    state = load_checkpoint(str(tmp_path), {"net": net2}, opt2)
    assert state["step"] == 3
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)
    x = torch.randn(5, 4)
    for o, n in ((opt, net), (opt2, net2)):
        o.zero_grad()
        n(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.allclose(p, q)


def test_shipped_default_config_matches_the_code():
    from pathlib import Path

    import yaml

    from lotscan.config import LotscanConfig

    shipped = yaml.safe_load((Path(__file__).parents[1] / "configs" / "default.yaml").read_text())
    assert shipped == LotscanConfig().to_dict()
