"""Method name -> implementation."""

from __future__ import annotations

from torch import nn

from lotscan.config import LotscanConfig
from lotscan.models.method import AnomalyMethod
from lotscan.models.methods.diffad import DiffADMethod
from lotscan.models.methods.drdc import DRDCMethod
from lotscan.models.methods.dta import DTAMethod
from lotscan.models.methods.recon import ReconMethod

METHODS: dict[str, type[AnomalyMethod]] = {
    "recon": ReconMethod,
    "dta": DTAMethod,
    "diffad": DiffADMethod,
    "drdc": DRDCMethod,
}


def build_method(cfg: LotscanConfig, networks: dict[str, nn.Module] | None = None) -> AnomalyMethod:
    try:
        cls = METHODS[cfg.method]
    except KeyError:
        raise ValueError(
            f"method {cfg.method!r} is not implemented in this version "
            f"(available: {', '.join(sorted(METHODS))})"
        ) from None
    return cls(cfg, networks)
