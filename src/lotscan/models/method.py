"""The interface every anomaly-detection method implements.

A method owns its networks (plain ``nn.Module`` s, saved one safetensors file
each), says how each training stage computes its loss, and splits scoring into
independent work units whose partial results reduce associatively (see
:mod:`lotscan.models.reduction`). Normalisation, smoothing, image scores and
thresholds are shared and live in :mod:`lotscan.models.scoring`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from lotscan.config import LotscanConfig
from lotscan.models.noise import counter_normal, stream_keys
from lotscan.models.reduction import Partial


def unit_noise(
    seeds: Sequence[int] | torch.Tensor, stream: int, shape: tuple[int, ...], device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian noise (B, *shape) for a batch, drawn on ``device`` in one
    vectorised call: every value is a counter-based hash of (the image's
    content seed, ``stream``, the value's index in ``shape``)
    (:mod:`lotscan.models.noise`), so an image gets the same noise whatever
    batch, actor, unit split or device it is scored on, with no generator
    state and no host-to-device copy (the seeds' hashes are cached on the
    device). Changed from per-image CPU ``torch.Generator`` s: the values
    differ from those, so bundles calibrated before are stale."""
    numel = math.prod(shape)
    keys = stream_keys(seeds, stream, device)
    return counter_normal(keys, numel, dtype).reshape(keys.shape[0], *shape)


class AnomalyMethod:
    """Base class: networks + training losses + unit-wise scoring."""

    name: ClassVar[str]
    signal_names: ClassVar[tuple[str, ...]]
    """Per-pixel signals ``finalize`` returns; each is normalised with its own
    calibrated range before ``fuse``."""
    stages: ClassVar[tuple[str, ...]]
    """Training stages in order; each is one Ray Train run. A stage trains
    ``stage_networks(stage)``; every other network is frozen in it (loaded from
    pretrained weights or from the stages before it)."""
    pretrained_networks: ClassVar[tuple[str, ...]] = ()
    """Networks initialised from pretrained weights by ``init_pretrained`` and
    never trained (DRDC's frozen backbone)."""
    default_smoothing_kernel: ClassVar[int] = 5
    """Mean filter of the signals when ``score.smoothing_kernel`` is ``None``
    (chosen: 5 px at 64 px input)."""
    default_augment_flips: ClassVar[bool] = True
    """Random flips of the training images when ``train.augment_flips`` is ``None``."""

    def __init__(self, cfg: LotscanConfig, networks: dict[str, nn.Module] | None = None):
        self.cfg = cfg
        self.networks: dict[str, nn.Module] = networks if networks is not None else self.build_networks()

    # --- networks -----------------------------------------------------------------
    def build_networks(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def to(self, device: torch.device | str) -> AnomalyMethod:
        for net in self.networks.values():
            net.to(device)
        return self

    def eval(self) -> AnomalyMethod:
        for net in self.networks.values():
            net.eval()
            net.requires_grad_(False)
        return self

    @property
    def device(self) -> torch.device:
        return next(next(iter(self.networks.values())).parameters()).device

    # --- training -----------------------------------------------------------------
    def stage_networks(self, stage: str) -> list[str]:
        """Names of the networks optimised in ``stage``."""
        raise NotImplementedError

    def training_loss(
        self, stage: str, nets: dict[str, nn.Module], images: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Loss of one batch of normal images (N, 3, H, W) in [-1, 1]. ``nets`` are
        the networks of this stage, possibly wrapped for data-parallel training."""
        raise NotImplementedError

    def stage_settings(self, stage: str) -> dict[str, Any]:
        """The configuration a stage's result depends on, besides the data, the
        training settings and the weights of the networks it builds on (the
        platform hashes those itself): a checkpoint is resumed, or reused by a
        later ``--stages`` run, only when this is unchanged. List only what
        this stage trains with, nothing used only at scoring time. Default: the
        method's whole config section."""
        data = self.cfg.to_dict()
        return {self.name: data.get(self.name), "image_size": self.cfg.data.image_size}

    def init_pretrained(self, read_bytes: Callable[[str], bytes]) -> dict[str, str]:
        """Load the weights of ``pretrained_networks`` before training, reading any
        user-given file through ``read_bytes(uri)``; return a description of
        what was loaded per network, recorded in the bundle. Raise ``ValueError``
        naming the config field when weights are required but missing."""
        return {}

    def training_resource_uris(self) -> dict[str, str]:
        """Image collections training needs besides the normal images (DiffAD's
        anomaly texture source), by name; the platform decodes each and hands
        them to ``set_training_resources``."""
        return {}

    def set_training_resources(self, resources: dict[str, np.ndarray]) -> None:
        """Receive the decoded collections of ``training_resource_uris`` as uint8
        arrays shaped (N, H, W, 3) at ``data.image_size``."""

    # --- scoring ------------------------------------------------------------------
    @classmethod
    def signal_names_for(cls, config: dict[str, Any]) -> tuple[str, ...]:
        """The signals a bundle whose stored config is ``config`` (the
        ``LotscanConfig.to_dict()`` form, not yet validated: read it defensively)
        is calibrated on: ``signal_names``, unless a scoring setting changes
        them (DiffAD's and DRDC's ``scoring: trend``, whose instances then
        report the same through ``signal_names``)."""
        return cls.signal_names

    def needs_grad(self) -> bool:
        """Whether ``partial`` takes gradients (``torch.enable_grad`` and
        ``torch.autograd.grad`` inside, as DTA's uncertainty does). The scorer
        runs a method that does not under ``torch.inference_mode`` (no autograd
        bookkeeping at all), one that does under ``torch.no_grad``, since
        ``enable_grad`` has no effect inside inference mode."""
        return False

    def num_units(self) -> int:
        raise NotImplementedError

    def partial(self, images: torch.Tensor, seeds: Sequence[int], units: Sequence[int]) -> Partial:
        """Partial result of ``units`` for images (B, 3, H, W) in [-1, 1]."""
        raise NotImplementedError

    def finalize(self, partial: Partial) -> dict[str, torch.Tensor]:
        """Raw per-pixel signals (B, H, W) from the partial of all units."""
        raise NotImplementedError

    def fuse(self, normalised: dict[str, torch.Tensor]) -> torch.Tensor:
        """Anomaly map (B, H, W) from the normalised signals."""
        raise NotImplementedError
