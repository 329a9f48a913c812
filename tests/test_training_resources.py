"""Training inputs besides the normal images, decoded by the platform: DiffAD's
anomaly textures (no Ray needed)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from lotscan.config import load_config
from lotscan.models.registry import build_method
from lotscan.platform.errors import TrainingError
from lotscan.platform.training import _training_resources


def _textures(folder, n: int, size: int = 40) -> None:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"texture-{i}.png"))


def test_anomaly_textures_are_decoded_at_the_model_size(tmp_path):
    folder = tmp_path / "dtd"
    _textures(folder, 3)
    (folder / "broken.png").write_bytes(b"not a png")
    logged: list[str] = []
    cfg = load_config(overrides=["method=diffad", "data.image_size=32",
                                 f"diffad.anomaly_source_uri={folder}"])
    method = build_method(cfg)
    resources = _training_resources(method, cfg, logged.append)
    assert set(resources) == {"anomaly_textures"}
    assert resources["anomaly_textures"].shape == (3, 32, 32, 3)
    assert resources["anomaly_textures"].dtype == np.uint8
    assert any("broken.png" in line for line in logged)  # skipped, and said so


def test_no_texture_source_means_no_resources_and_an_unreadable_one_is_an_error(tmp_path):
    cfg = load_config(overrides=["method=diffad", "data.image_size=32"])
    assert _training_resources(build_method(cfg), cfg, print) == {}
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "only.png").write_bytes(b"garbage")
    cfg = load_config(overrides=["method=diffad", "data.image_size=32",
                                 f"diffad.anomaly_source_uri={folder}"])
    with pytest.raises(TrainingError, match="no readable images"):
        _training_resources(build_method(cfg), cfg, lambda m: None)


def test_latest_checkpoint_picks_the_highest_step_from_a_relative_path(tmp_path, monkeypatch):
    import json

    from lotscan.config import StorageConfig
    from lotscan.platform.training import latest_checkpoint

    run = tmp_path / "model" / "checkpoints" / "segmenter-abc"
    for folder, step in (("checkpoint_2026-11-23_08-00-00.000001", 40),
                         ("checkpoint_2026-11-23_07-00-00.000001", 80)):
        (run / folder / "nested").mkdir(parents=True)
        (run / folder / "state.json").write_text(json.dumps({"step": step}))
        (run / folder / "segmenter.safetensors").write_bytes(f"weights {step}".encode())
        (run / folder / "nested" / "extra.txt").write_text(str(step))
    (run / "checkpoint_2026-11-23_09-00-00.000001").mkdir()  # still being written: no state.json
    monkeypatch.chdir(tmp_path)
    local = latest_checkpoint("model/checkpoints", "segmenter-abc", StorageConfig())
    assert open(os.path.join(local, "segmenter.safetensors"), "rb").read() == b"weights 80"
    assert open(os.path.join(local, "nested", "extra.txt")).read() == "80"
    with pytest.raises(TrainingError, match="no finished checkpoint"):
        latest_checkpoint("model/checkpoints", "other-run", StorageConfig())
