"""The associative reduction every method's fusion is written as.

A method splits the work for an image into independent *units* (DTA: noise
levels; DRDC: mask sets x timesteps; DiffAD: samples). Each unit, or any
subset of units, yields a *partial*: a dict of tensors whose entries add up.
Partials from any split of the units are combined by :func:`combine_partials`
(a plain sum, so order and grouping do not matter) and turned into per-pixel
signals by the method's ``finalize``. Running all units in one actor, or
fanning them out across actors and reducing afterwards, therefore gives the
same heatmap.

:class:`FourierTrend` is DTA's instance: the DFT coefficient of index ``m``
over a sequence of ``N`` entries is ``sum_k s_k exp(-2 pi i m k / N)``, a
weighted sum over levels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache

import torch

Partial = dict[str, torch.Tensor]


def combine_partials(partials: Iterable[Partial]) -> Partial:
    """Sum partials entry by entry. All partials must have the same keys."""
    out: Partial = {}
    keys: set[str] | None = None
    for part in partials:
        if keys is None:
            keys = set(part)
            out = {k: v.clone() for k, v in part.items()}
            continue
        if set(part) != keys:
            raise ValueError(f"partials have different entries: {sorted(keys)} vs {sorted(part)}")
        for k, v in part.items():
            out[k] = out[k] + v
    if keys is None:
        raise ValueError("no partials to combine")
    return out


class FourierTrend:
    """Magnitude of one DFT coefficient of a per-pixel sequence, as a reduction.

    ``partial(signal, indices)`` takes the sequence entries at positions
    ``indices`` (signal shaped (B, L, ...) with L == len(indices)) and returns the
    real and imaginary parts of their contribution; ``finalize`` takes the modulus.
    """

    def __init__(self, length: int, index: int = 1):
        if not 0 <= index < length:
            raise ValueError(f"Fourier index {index} outside a sequence of length {length}")
        self.length = length
        self.index = index

    def twiddles(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angle = -2.0 * math.pi * self.index * indices.to(torch.float64) / self.length
        return torch.cos(angle), torch.sin(angle)

    def partial(self, signal: torch.Tensor, indices: torch.Tensor | Sequence[int], name: str) -> Partial:
        """Host-side ``indices`` (a sequence or a CPU tensor) reach the device once:
        their twiddles are cached per (indices, device, dtype), so repeated passes
        over the same unit chunks copy nothing."""
        if isinstance(indices, torch.Tensor) and indices.device.type != "cpu":
            cos, sin = (w.to(signal.dtype) for w in self.twiddles(indices.to(signal.device)))
        else:
            idx = tuple(int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices))
            cos, sin = _cached_twiddles(self.length, self.index, idx, signal.device, signal.dtype)
        shape = (1, -1) + (1,) * (signal.dim() - 2)
        return {f"{name}_re": (signal * cos.view(shape)).sum(dim=1),
                f"{name}_im": (signal * sin.view(shape)).sum(dim=1)}

    @staticmethod
    def finalize(partial: Partial, name: str) -> torch.Tensor:
        return torch.sqrt(partial[f"{name}_re"] ** 2 + partial[f"{name}_im"] ** 2)


@lru_cache(maxsize=256)
def _cached_twiddles(length: int, index: int, indices: tuple[int, ...], device: torch.device,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = FourierTrend(length, index).twiddles(torch.tensor(indices, dtype=torch.long))
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)
