"""Counter-based Gaussian noise: a pure function of (image seed, stream, element).

Scoring noise must not depend on which batch, actor or unit split an image is
scored in, and should be drawn on the device in one call per batch. A
stateful generator per image (``torch.Generator``) does the first but not the
second. Here every noise value is a hash of its coordinates instead:

1. ``key = mix64(mix64(seed + G) ^ mix64(stream + 2G))`` per image (``G`` the
   64-bit golden ratio, ``mix64`` the splitmix64 finaliser, a bijection of
   the 64-bit integers with full avalanche);
2. ``h_j = mix64(key + (j + 1) G)`` for pair ``j`` of the image's elements
   (splitmix64's own output sequence started at ``key``);
3. the high and low 32 bits of ``h_j`` are two uniforms, turned into two
   independent N(0, 1) values by Box-Muller (``r cos(theta)``, ``r sin(theta)``),
   elements ``2j`` and ``2j + 1`` of the image's flattened noise.

Steps 1-2 are integer arithmetic modulo 2^64, written with int64 tensors
(two's-complement wrap-around is arithmetic modulo 2^64; logical right shifts
are arithmetic shifts masked to the low bits), so the hashes are bit-identical
on every device and equal the Python reference :func:`mix64_int`. Step 3 runs
in float64 and is then cast: CPU and CUDA libm results differ in the last
float64 bit at most, which survives the cast to float32 only when a value lies
within that bit of a float32 rounding boundary (about 1 value in 2^29).
The tails are cut at |z| = sqrt(64 ln 2) = 6.66 (32-bit uniforms), which a
N(0, 1) exceeds with probability 3e-11.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

_U64 = 1 << 64


def _signed(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value`` mod 2^64."""
    value %= _U64
    return value - _U64 if value >= 1 << 63 else value


GOLDEN = 0x9E3779B97F4A7C15
"""2^64 / golden ratio, splitmix64's increment."""
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_S_GOLDEN, _S_M1, _S_M2 = _signed(GOLDEN), _signed(_M1), _signed(_M2)
_LOW32 = (1 << 32) - 1


def mix64_int(z: int) -> int:
    """splitmix64's finaliser on a Python integer (the reference, mod 2^64)."""
    z %= _U64
    z = ((z ^ (z >> 30)) * _M1) % _U64
    z = ((z ^ (z >> 27)) * _M2) % _U64
    return z ^ (z >> 31)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (``>>`` on int64 is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors, bit for bit :func:`mix64_int`."""
    z = (z ^ _shr(z, 30)) * _S_M1
    z = (z ^ _shr(z, 27)) * _S_M2
    return z ^ _shr(z, 31)


@lru_cache(maxsize=512)
def _seed_hashes(seeds: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``mix64(seed + G)`` per image, on ``device``; cached so that drawing many
    streams for the same batch (DRDC: every DDIM step) copies the seeds to the
    device once."""
    return torch.tensor([_signed(mix64_int(s + GOLDEN)) for s in seeds], dtype=torch.int64,
                        device=device)


def stream_keys(seeds: Sequence[int] | torch.Tensor, stream: int,
                device: torch.device | str) -> torch.Tensor:
    """Per-image int64 keys (B,) of ``stream`` on ``device``. ``seeds`` may be
    Python integers (any size, taken mod 2^64) or an int64 tensor of seeds."""
    device = torch.device(device)
    if isinstance(seeds, torch.Tensor):
        if seeds.dtype != torch.int64 or seeds.dim() != 1:
            raise ValueError(f"seeds must be a 1-d int64 tensor, got {seeds.dtype} {tuple(seeds.shape)}")
        hashed = mix64(seeds.to(device) + _S_GOLDEN)
    else:
        hashed = _seed_hashes(tuple(int(s) for s in seeds), device)
    return mix64(hashed ^ _signed(mix64_int(int(stream) + 2 * GOLDEN)))


def _mix64_(z: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """:func:`mix64` in place on ``z``, with ``tmp`` (same shape) as scratch."""
    for shift, mult in ((30, _S_M1), (27, _S_M2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=tmp)
        tmp.bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(mult)
    return z


def counter_bits(keys: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The 64-bit hashes ``h_j = mix64(key + (j+1) G)`` (B, stop - start) of
    keys (B,) for pairs j in [start, stop)."""
    j = torch.arange(start + 1, stop + 1, dtype=torch.int64, device=keys.device)
    z = keys.view(-1, 1) + j * _S_GOLDEN
    return _mix64_(z, torch.empty_like(z))


def _normal_pairs(keys: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Box-Muller pairs (B, stop - start, 2) in float64 for pairs [start, stop)."""
    h = counter_bits(keys, start, stop)
    bits = _shr(h, 32).add_(1)  # (0, 2^32]: u1 in (0, 1], so the log stays finite
    r = bits.to(torch.float64).mul_(2.0 ** -32).log_().mul_(-2.0).sqrt_()
    theta = h.bitwise_and_(_LOW32).to(torch.float64).mul_(2.0 * math.pi * 2.0 ** -32)
    out = torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1)
    return out.mul_(r.unsqueeze(-1))


CPU_BLOCK_PAIRS = 1 << 16
"""Pairs per block on the CPU (summed over the batch): blocks of 64 Ki pairs
keep each pass's temporaries in cache, about 3x faster than one pass over the
whole batch (benchmarks/noise_bench.py). Other devices draw in one block.
The values do not depend on the blocking."""


def counter_normal(keys: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32,
                   block_pairs: int | None = None) -> torch.Tensor:
    """N(0, 1) values (B, numel) from per-image keys (B,), in one call. Value
    ``e`` of image ``b`` is element ``e % 2`` of Box-Muller pair ``e // 2`` of
    ``keys[b]``, whatever the blocking (``block_pairs`` pairs per image per
    block; default: one block on an accelerator, cache-sized on the CPU)."""
    b, pairs = keys.shape[0], (numel + 1) // 2
    if block_pairs is None:
        block_pairs = pairs if keys.device.type != "cpu" else max(1, CPU_BLOCK_PAIRS // max(b, 1))
    if block_pairs >= pairs:
        return _normal_pairs(keys, 0, pairs).to(dtype).view(b, -1)[:, :numel]
    out = torch.empty(b, pairs, 2, dtype=dtype, device=keys.device)
    for start in range(0, pairs, block_pairs):
        stop = min(pairs, start + block_pairs)
        out[:, start:stop] = _normal_pairs(keys, start, stop)
    return out.view(b, -1)[:, :numel]
