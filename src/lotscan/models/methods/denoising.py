"""What ``recon`` and ``dta`` share: one pixel-space DDPM denoiser."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from lotscan.models.denoiser import build_unet
from lotscan.models.diffusion import NoiseSchedule, ddpm_loss, unet_eps_model
from lotscan.models.method import AnomalyMethod


class DenoiserMethod(AnomalyMethod):
    """A method whose only network is the denoiser, trained with the DDPM loss."""

    stages = ("denoiser",)

    def build_networks(self) -> dict[str, nn.Module]:
        return {"denoiser": build_unet(self.cfg.denoiser, self.cfg.data.image_size)}

    @cached_property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(self.cfg.denoiser)

    def stage_networks(self, stage: str) -> list[str]:
        if stage != "denoiser":
            raise ValueError(f"{self.name} has one training stage, 'denoiser', not {stage!r}")
        return ["denoiser"]

    def training_loss(self, stage, nets, images, generator) -> torch.Tensor:
        return ddpm_loss(unet_eps_model(nets["denoiser"]), self.schedule, images, generator)

    def stage_settings(self, stage: str) -> dict:
        # recon and dta train the same denoiser: either's checkpoint serves both.
        return {"denoiser": self.cfg.to_dict()["denoiser"], "image_size": self.cfg.data.image_size}

    def eps_model(self):
        return unet_eps_model(self.networks["denoiser"])
