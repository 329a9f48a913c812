"""The counter-based scoring noise (lotscan.models.noise, unit_noise)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from lotscan.models import noise
from lotscan.models.method import unit_noise

U64 = 1 << 64


def splitmix64_reference(key: int, j: int) -> int:
    """Pair j's hash in plain Python integers: splitmix64's output number j+1
    from state ``key`` (Steele, Lea, Flood 2014), written out independently."""
    z = (key + (j + 1) * 0x9E3779B97F4A7C15) % U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % U64
    return z ^ (z >> 31)


def reference_normal(seed: int, stream: int, numel: int) -> np.ndarray:
    """unit_noise for one image, from Python integers and math's libm only."""
    key = noise.mix64_int(noise.mix64_int(seed + noise.GOLDEN) ^ noise.mix64_int(stream + 2 * noise.GOLDEN))
    out = []
    for j in range((numel + 1) // 2):
        h = splitmix64_reference(key, j)
        r = math.sqrt(-2.0 * math.log(((h >> 32) + 1) * 2.0 ** -32))
        theta = (h & 0xFFFFFFFF) * (2.0 * math.pi * 2.0 ** -32)
        out += [r * math.cos(theta), r * math.sin(theta)]
    return np.array(out[:numel])


def test_int64_hash_equals_unsigned_64_bit_arithmetic():
    rng = np.random.default_rng(0)
    values = [0, 1, -1, 2**63 - 1, -(2**63)] + [int(v) for v in rng.integers(-(2**63), 2**63 - 1, 200)]
    got = noise.mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [g % U64 for g in got] == [noise.mix64_int(v) for v in values]
    key = -1234567890123456789
    bits = noise.counter_bits(torch.tensor([key]), 5, 12)[0].tolist()
    assert [b % U64 for b in bits] == [splitmix64_reference(key % U64, j) for j in range(5, 12)]


def test_unit_noise_equals_the_python_reference():
    seeds, stream, shape = [7, 2**62 + 5, 0], 13, (3, 5, 7)  # odd element count
    got = unit_noise(seeds, stream, shape, "cpu", torch.float64)
    assert got.shape == (3, 3, 5, 7)
    for b, seed in enumerate(seeds):
        ref = reference_normal(seed, stream, 105).reshape(shape)
        np.testing.assert_allclose(got[b].numpy(), ref, rtol=0, atol=1e-12)


def test_values_do_not_depend_on_batch_blocking_or_seed_form():
    shape = (3, 16, 16)
    whole = unit_noise([11, 12, 13], 4, shape, "cpu")
    assert torch.equal(unit_noise([13], 4, shape, "cpu")[0], whole[2])
    assert torch.equal(unit_noise([13, 11], 4, shape, "cpu"), whole[[2, 0]])
    assert torch.equal(unit_noise(torch.tensor([11, 12, 13]), 4, shape, "cpu"), whole)
    keys = noise.stream_keys([11, 12, 13], 4, "cpu")
    for block in (1, 7, 100, 10**6):
        assert torch.equal(noise.counter_normal(keys, 768, block_pairs=block).view(3, *shape), whole)
    assert torch.equal(unit_noise([11, 12, 13], 4, shape, "cpu"), whole)  # deterministic
    half = unit_noise([11], 4, shape, "cpu", torch.float16)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), whole[0], atol=2e-3)


def test_distribution_is_standard_normal():
    x = unit_noise(list(range(8)), 0, (3, 64, 64), "cpu", torch.float64).flatten().numpy()
    n = x.size  # 98304
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.std() - 1) < 5 * math.sqrt(0.5 / n)
    assert abs(stats.skew(x)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(x)) < 5 * math.sqrt(24 / n)
    assert stats.kstest(x, "norm").pvalue > 1e-3
    # Both halves of a Box-Muller pair, and every image, are N(0, 1) on their own.
    assert stats.kstest(x[0::2], "norm").pvalue > 1e-3
    assert stats.kstest(x[1::2], "norm").pvalue > 1e-3


def test_draws_are_uncorrelated_across_seeds_streams_and_neighbours():
    shape = (3, 64, 64)
    n = math.prod(shape)
    bound = 5 / math.sqrt(n)
    base = unit_noise([5], 0, shape, "cpu", torch.float64).flatten()
    others = [
        unit_noise([6], 0, shape, "cpu", torch.float64),  # next seed
        unit_noise([5], 1, shape, "cpu", torch.float64),  # next stream
        unit_noise([5 + 2**32], 0, shape, "cpu", torch.float64),  # seeds differing in high bits
        # the old scheme seeded (seed * 1_000_003 + stream): these two collided
        unit_noise([4], 1_000_003, shape, "cpu", torch.float64),
    ]
    for other in others:
        r = torch.corrcoef(torch.stack([base, other.flatten()]))[0, 1].item()
        assert abs(r) < bound
    old_collision = unit_noise([4], 1_000_003, shape, "cpu")[0]
    assert not torch.allclose(old_collision, unit_noise([5], 0, shape, "cpu")[0])
    for lag in (1, 2, 64):  # within a pair (cos, sin), between pairs, between rows
        r = torch.corrcoef(torch.stack([base[:-lag], base[lag:]]))[0, 1].item()
        assert abs(r) < bound
    # squares too: the pair shares its radius, yet z0^2 and z1^2 are independent
    r = torch.corrcoef(torch.stack([base[0::2] ** 2, base[1::2] ** 2]))[0, 1].item()
    assert abs(r) < 5 / math.sqrt(n / 2)


def test_bad_seed_tensor_is_named():
    with pytest.raises(ValueError, match="seeds must be a 1-d int64 tensor"):
        unit_noise(torch.tensor([1.0, 2.0]), 0, (3,), "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_equal_cpu_draws():
    seeds = [3, 2**61 + 17]
    keys_cpu = noise.stream_keys(seeds, 9, "cpu")
    keys_gpu = noise.stream_keys(seeds, 9, "cuda")
    assert torch.equal(noise.counter_bits(keys_gpu, 0, 5000).cpu(), noise.counter_bits(keys_cpu, 0, 5000))
    cpu = unit_noise(seeds, 9, (3, 128, 128), "cpu")
    gpu = unit_noise(seeds, 9, (3, 128, 128), "cuda").cpu()
    assert (cpu != gpu).float().mean().item() < 1e-6
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-6)
