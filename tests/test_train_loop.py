"""The per-worker training loop's parts, without Ray: batches per step with a
per-epoch shuffle, the progress line and its ETA, the precision flag."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lotscan.config import ConfigError, load_config
from lotscan.models.registry import build_method
from lotscan.platform.train_loop import EpochBatches, StageSteps, duration, progress_line


def _chunks(n: int, sizes=(5, 3, 4)) -> list[np.ndarray]:
    """Chunks whose images carry their global index in pixel [0, 0, 0]."""
    out, start = [], 0
    for size in sizes:
        chunk = np.zeros((size, 2, 2, 3), np.uint8)
        chunk[:, 0, 0, 0] = np.arange(start, start + size)
        out.append(chunk)
        start += size
    assert start == n
    return out


def test_each_epoch_deals_every_image_once_across_workers_in_a_new_order():
    chunks = _chunks(12)
    workers = [EpochBatches(chunks, batch_size=3, rank=r, world_size=2, seed=0) for r in range(2)]
    assert workers[0].steps_per_epoch == 2  # 6 images per worker, batches of 3
    epochs = []
    for epoch in range(3):
        seen = [int(i) for w in workers for s in range(2)
                for i in w.batch(epoch * 2 + s)[:, 0, 0, 0]]
        assert sorted(seen) == list(range(12))  # disjoint, complete
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]  # shuffled anew every epoch
    # A step's batch is a function of the step alone (what a resumed stage relies on).
    fresh = EpochBatches(chunks, batch_size=3, rank=1, world_size=2, seed=0)
    np.testing.assert_array_equal(fresh.batch(5), workers[1].batch(5))
    other_seed = EpochBatches(chunks, batch_size=3, rank=1, world_size=2, seed=1)
    assert not np.array_equal(other_seed.batch(0), fresh.batch(0))


def test_small_shards_and_too_many_workers():
    small = EpochBatches(_chunks(12), batch_size=16, rank=0, world_size=3, seed=0)
    assert small.batch_size == 4 and small.steps_per_epoch == 1 and len(small.batch(7)) == 4
    with pytest.raises(ValueError, match="at least one"):
        EpochBatches(_chunks(3, (3,)), batch_size=2, rank=0, world_size=4, seed=0)


def test_progress_line_names_the_budget_that_ends_first():
    # 25 steps in 40 s of a 5-minute budget: 0.625 steps/s -> 25 + 260 * 0.625 = 187.5.
    line = progress_line("denoiser", 25, 400, used_s=40, budget_s=300, steps_per_s=0.625,
                         loss=0.12345, images_per_s=10.0)
    assert "step 25/≈187 (time budget)" in line and "ETA 4m20s" in line
    assert "loss 0.1235" in line and "10.0 img/s" in line and "elapsed 40s" in line
    line = progress_line("denoiser", 25, 100, used_s=40, budget_s=3000, steps_per_s=0.625,
                         loss=0.1, images_per_s=10.0)
    assert "step 25/100 loss" in line and "ETA 2m00s" in line  # 75 steps / 0.625
    assert duration(3725) == "1h02m" and duration(59.6) == "1m00s"


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_flag_sets_the_forward_dtype_and_keeps_fp32_weights(precision, dtype):
    cfg = load_config(overrides=["method=dta", "data.image_size=16", "denoiser.block_out_channels=[8, 16]",
                                 "denoiser.norm_num_groups=4", f"train.precision={precision}"])
    torch.manual_seed(0)
    method = build_method(cfg)
    net = method.networks["denoiser"].train()
    seen = []
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    steps = StageSteps(method, "denoiser", {"denoiser": net}, optimizer, cfg.train,
                       torch.device("cpu"), torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in net.parameters()]
    images = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    steps.step(images)
    steps.step(images)
    assert seen and set(seen) == {dtype}
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    loss = steps.mean_loss()
    assert np.isfinite(loss) and steps.mean_loss() is None  # read once, then reset


def test_training_settings_are_checked():
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(overrides=["train.precision=fp16"])
    with pytest.raises(ConfigError, match="train.max_failures"):
        load_config(overrides=["train.max_failures=-2"])
    assert load_config(overrides=["train.max_failures=-1"]).train.max_failures == -1
