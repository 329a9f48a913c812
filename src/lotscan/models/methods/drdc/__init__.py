"""DRDC: Diffusion Refinement with Dual Conditioning (ECCV 2024); see :mod:`.method`."""

from lotscan.models.methods.drdc.method import DRDCMethod

__all__ = ["DRDCMethod"]
