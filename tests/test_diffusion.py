"""The noise schedule and the DDIM loop stay on the device (no host copies)."""

from __future__ import annotations

import math
import pickle

import torch
from diffusers import DDPMScheduler

from lotscan.models.diffusion import NoiseSchedule, ddim_timesteps, ddim_x0, tweedie_x0


def _eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.1 * x + 1e-3 * t.view(-1, 1, 1, 1).to(x.dtype)


def test_ddim_and_tweedie_run_on_the_meta_device():
    # A meta tensor has no data: any .cpu(), .item() or host-side indexing in the
    # loop raises "Cannot copy out of meta tensor", so this fails if the loop
    # ever moves timesteps or schedule values through the host.
    schedule = NoiseSchedule(1000, "linear")
    x = torch.empty(4, 3, 8, 8, device="meta")
    t = torch.tensor([0, 3, 100, 999]).to("meta")
    assert ddim_x0(_eps, schedule, x, t, 5).device.type == "meta"
    assert tweedie_x0(_eps, schedule, x, t).device.type == "meta"
    assert ddim_timesteps(t, 5).device.type == "meta"
    assert schedule.alpha_bar(t, x).device.type == "meta"


def test_schedule_table_is_built_once_per_device_and_dtype():
    schedule = NoiseSchedule(1000, "linear")
    first = schedule.table("cpu", torch.float32)
    assert schedule.table(torch.device("cpu"), torch.float32) is first
    assert schedule.table("cpu", torch.float64) is not first
    schedule.table("meta", torch.float32)
    copy = pickle.loads(pickle.dumps(schedule))  # the device cache does not travel
    assert copy._tables == {} and torch.equal(copy.table("cpu", torch.float32), first)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").alphas_cumprod.double()
    t = torch.tensor([-1, 0, 150, 999])
    a = schedule.alpha_bar(t, torch.zeros(4, 3, 2, 2, dtype=torch.float64)).flatten()
    assert a.tolist() == [1.0] + ref[[0, 150, 999]].tolist()
    sigma = schedule.sigma(torch.tensor([0, 150, 400]))
    expected = [math.sqrt((1 - ref[i].item()) / ref[i].item()) for i in (0, 150, 400)]
    assert torch.allclose(sigma, torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


def test_ddim_equals_the_update_written_out():
    # Caching the tables on the device changed no number: the float64 update by hand.
    schedule = NoiseSchedule(1000, "linear")
    torch.manual_seed(0)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([5, 60, 400])
    ref = ddim_x0(_eps, schedule, x, t, 4)
    seq = ddim_timesteps(t, 4)
    state = x
    for i in range(4):  # the DDIM update written out with the float64 table
        a_cur = schedule.alphas_cumprod[seq[:, i]].view(-1, 1, 1, 1)
        nxt = seq[:, i + 1]
        a_next = torch.where(nxt >= 0, schedule.alphas_cumprod[nxt.clamp(min=0)], 1.0).view(-1, 1, 1, 1)
        eps = _eps(state, seq[:, i])
        x0 = (state - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        state = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    assert torch.allclose(ref, state, atol=1e-12)
