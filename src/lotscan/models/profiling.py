"""How much arithmetic scoring does, how fast the hardware could do it, and the
naive loop the speed-ups are measured against (``lotscan bench``; docs/speed.md).

- :func:`count_flops`: floating-point operations of one real call, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, as
  2 x multiply-accumulates, backward passes included: DTA's uncertainty is an
  ``autograd.grad`` per probe). Element-wise work (norms, activations, the
  DDIM updates, the Fourier reduction) is not counted, so the achieved
  GFLOP/s derived from it is a lower bound of what the hardware does.
- :func:`matmul_peak` / :func:`conv1x1_peak`: a short probe of what this device
  reaches on large, friendly problems (square matmuls; a 1x1 convolution in
  channels_last), in fp32 or bf16: the denominator of "share of peak".
- :func:`reference_scores`: what a paper's code runs for the same output, one
  image and one work unit per network call, in fp32, reduced and finalized by
  the same :class:`~lotscan.models.scoring.Scorer` code, so that its scores
  equal the batched scorer's to float rounding.

No Ray and no storage here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lotscan.models.calibration import Calibration
from lotscan.models.method import AnomalyMethod
from lotscan.models.reduction import combine_partials
from lotscan.models.scoring import PRECISIONS, Scorer, ScoreResult


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """Floating-point operations of ``fn(*args, **kwargs)``, run once for real
    (matmul and convolution FLOPs = 2 x MACs, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def _dtype(precision: str | torch.dtype) -> torch.dtype:
    if isinstance(precision, torch.dtype):
        return precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def _best_rate(step: Callable[[], None], flops_per_step: float, seconds: float,
               device: torch.device) -> float:
    """Best GFLOP/s of ``step`` over timed repeats filling about ``seconds``,
    after one warm-up call."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step()
    sync()
    start = time.perf_counter()
    step()
    sync()
    once = max(time.perf_counter() - start, 1e-9)
    reps = max(1, int(seconds / 5 / once))  # about 5 trials of `reps` steps each
    best = once
    deadline = time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        for _ in range(reps):
            step()
        sync()
        best = min(best, (time.perf_counter() - start) / reps)
        if time.perf_counter() >= deadline:
            break
    return flops_per_step / best / 1e9


def matmul_peak(precision: str | torch.dtype = "fp32", seconds: float = 1.0,
                device: torch.device | str = "cpu", n: int = 1024) -> float:
    """GFLOP/s of square ``n`` x ``n`` matmuls in ``precision`` on ``device``
    (best of the repeats in about ``seconds``; ``2 n^3`` FLOPs each)."""
    device = torch.device(device)
    dtype = _dtype(precision)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    with torch.inference_mode():
        return _best_rate(lambda: torch.mm(a, b, out=out), 2.0 * n ** 3, seconds, device)


def conv1x1_peak(precision: str | torch.dtype = "fp32", seconds: float = 1.0,
                 device: torch.device | str = "cpu", channels: int = 256, size: int = 32,
                 batch: int = 8) -> float:
    """GFLOP/s of a 1x1 convolution (``channels`` in and out, ``batch`` images of
    ``size`` px) in channels_last: a convolution at its friendliest."""
    device = torch.device(device)
    dtype = _dtype(precision)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(channels, channels, 1, 1, generator=gen).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    w = w.contiguous(memory_format=torch.channels_last)
    flops = 2.0 * batch * size * size * channels * channels
    with torch.inference_mode():
        return _best_rate(lambda: F.conv2d(x, w), flops, seconds, device)


def reference_scores(method: AnomalyMethod, calibration: Calibration | None, images: np.ndarray,
                     seeds: Sequence[int], device: torch.device | str = "cpu",
                     categories: Sequence[str] | None = None) -> ScoreResult:
    """Score ``images`` as a paper's code would: per image, per work unit, one
    call of the method at batch 1 (fp32, default memory format, ``no_grad``),
    the units' partials summed with :func:`combine_partials`, then the
    scorer's finalize, normalisation and image score. The same
    :class:`ScoreResult` as ``Scorer.score`` to float rounding: the baseline
    of ``lotscan bench --reference``."""
    if len(seeds) != len(images):
        raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
    scorer = Scorer(method, calibration, device, max_units_per_pass=1, precision="fp32",
                    channels_last=False)
    scorer._use_memory_format()
    x = torch.as_tensor(np.ascontiguousarray(images))
    per_image = []
    with torch.no_grad():
        for i, seed in enumerate(seeds):
            xi = scorer.model_input(x[i:i + 1])
            per_image.append(combine_partials(
                method.partial(xi, [int(seed)], [u]) for u in range(method.num_units())))
    partial = {k: torch.cat([p[k] for p in per_image]) for k in per_image[0]}
    return scorer.score_partial(partial, categories)
