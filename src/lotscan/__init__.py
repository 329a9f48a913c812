"""lotscan: diffusion-model anomaly detection for production lots, on Ray."""

__version__ = "0.1.0"
