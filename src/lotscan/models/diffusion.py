"""DDPM training and DDIM prediction of x0, for any epsilon-predicting network.

The noise schedule comes from a diffusers scheduler (swappable through
``DenoiserConfig.beta_schedule``); the reverse loops are written out here
because anomaly detection starts them at arbitrary, per-sample timesteps
(every level of a DTA sweep is a different start), which diffusers' samplers
do not do. All functions take per-sample timesteps of shape ``(N,)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDPMScheduler

from lotscan.config import DenoiserConfig

# eps_model(x_t, t) -> predicted noise; t is a LongTensor of shape (N,).
EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NoiseSchedule:
    """Cumulative alphas of the forward process, indexable by integer timestep.

    Lookups never leave the device: the table (with alpha_bar = 1 for the clean
    image, timestep -1, prepended) is kept per (device, dtype) and indexed with
    the timesteps where they are, so a DDIM loop on a GPU does no host-device
    synchronisation (pass timesteps on the device: a CPU ``t`` with a GPU
    ``like`` costs a copy per call)."""

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 1e-4, beta_end: float = 0.02):
        scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                  beta_start=beta_start, beta_end=beta_end)
        self.num_train_timesteps = num_train_timesteps
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def __getstate__(self) -> dict:
        # Device tables are a cache: a pickled schedule must load where that device is absent.
        return {**self.__dict__, "_tables": {}}

    @classmethod
    def from_config(cls, cfg: DenoiserConfig) -> NoiseSchedule:
        return cls(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end)

    def table(self, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """``[1, alpha_bar_0, ..., alpha_bar_{T-1}]`` on ``device`` in ``dtype``
        (entry ``t + 1`` is timestep ``t``), built once per device and dtype."""
        key = (torch.device(device), dtype)
        table = self._tables.get(key)
        if table is None:
            full = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
            table = self._tables[key] = full.to(device=key[0], dtype=dtype)
        return table

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t for timesteps ``t`` (``-1`` means the clean image, alpha_bar = 1),
        shaped to broadcast against ``like`` (N, C, H, W), on ``like``'s device."""
        table = self.table(like.device, like.dtype)
        a = table[t.to(device=like.device, dtype=torch.long) + 1]
        return a.view(-1, *([1] * (like.dim() - 1)))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise size ``sqrt((1 - abar_t) / abar_t)`` of timestep ``t`` in the
        coordinates ``x_t / sqrt(abar_t) = x0 + sigma_t * eps`` (float64, on t's device)."""
        a = self.table(t.device, torch.float64)[t.long() + 1]
        return ((1 - a) / a).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddpm_loss(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The simple DDPM objective: MSE between the drawn and the predicted noise
    at a uniformly drawn timestep."""
    n = x0.shape[0]
    t = torch.randint(0, schedule.num_train_timesteps, (n,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    x_t = schedule.add_noise(x0, noise, t)
    return torch.nn.functional.mse_loss(eps_model(x_t, t), noise)


def tweedie_x0(eps_model: EpsModel, schedule: NoiseSchedule, x_t: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
    """One-step posterior-mean estimate of x0 from x_t."""
    a = schedule.alpha_bar(t, x_t)
    eps = eps_model(x_t, t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def ddim_timesteps(t_start: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-sample DDIM schedules of shape (N, steps + 1), on ``t_start``'s device:
    evenly spaced from each sample's start down to -1 (the clean image);
    repeated entries (a start smaller than ``steps``) become no-op steps."""
    frac = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=t_start.device)
    start = t_start.to(torch.float64).view(-1, 1)
    return torch.round((start + 1) * frac - 1).long()


def ddim_x0(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    t: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) reconstruction of x0 from x_t in ``steps``
    model calls. ``steps == 1`` equals :func:`tweedie_x0`. The schedule is
    built on ``x_t``'s device once; the loop does no host-device transfer."""
    seq = ddim_timesteps(t.to(x_t.device), steps)
    x = x_t
    for i in range(steps):
        t_cur, t_next = seq[:, i], seq[:, i + 1]
        a_cur = schedule.alpha_bar(t_cur, x)
        a_next = schedule.alpha_bar(t_next, x)
        eps = eps_model(x, t_cur.clamp(min=0))
        x0 = (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        x_new = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        # A sample whose schedule does not move at this step keeps its state.
        moving = (t_cur != t_next).view(-1, *([1] * (x.dim() - 1)))
        x = torch.where(moving, x_new, x)
    return x


def predict_x0(
    eps_model: EpsModel,
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    t: torch.Tensor,
    mode: str,
    ddim_steps: int,
) -> torch.Tensor:
    """x0 from x_t by ``mode``: ``tweedie`` (one call) or ``ddim`` (``ddim_steps`` calls)."""
    if mode == "tweedie":
        return tweedie_x0(eps_model, schedule, x_t, t)
    if mode == "ddim":
        return ddim_x0(eps_model, schedule, x_t, t, ddim_steps)
    raise ValueError(f"unknown x0 prediction mode {mode!r} (use tweedie or ddim)")


def unet_eps_model(unet: torch.nn.Module) -> EpsModel:
    """Adapt a diffusers UNet2DModel to ``eps_model(x_t, t)``."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t.to(x.device)).sample

    return eps
