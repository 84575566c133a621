"""One seed-mixing function for ints and tensors: deterministic, order-sensitive, 63-bit."""

import numpy as np
import pytest
import torch

from genfoundry.seeding import hash32, mix


def _lowbias32_uint32(x: int) -> int:
    """The reference: lowbias32 in wrapping 32-bit arithmetic."""
    x = np.uint32(x)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return int(x)


def test_hash32_on_ints_equals_hash32_on_an_int64_tensor_elementwise():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x12345678, 0xDEADBEEF, *range(3, 1000, 37)]
    tensor = hash32(torch.tensor(values, dtype=torch.int64))
    assert tensor.dtype == torch.int64
    assert tensor.tolist() == [hash32(v) for v in values]
    assert all(0 <= hash32(v) <= 0xFFFFFFFF for v in values)
    assert [hash32(v) for v in values] == [_lowbias32_uint32(v) for v in values]


def test_mix_is_deterministic_order_sensitive_and_63_bit():
    assert mix(3, 5, 7) == mix(3, 5, 7) == 0x7208776245DBE467  # the same on every run and platform
    assert mix(3, 5, 7) != mix(7, 5, 3) and mix(1, 2) != mix(2, 1)
    assert len({mix(5), mix(5, 0), mix(0, 5), mix(0), mix()}) == 5
    assert mix(1) != mix(1 << 32)  # both halves of a word count
    seeds = {mix(a, b) for a in range(64) for b in range(64)}
    assert len(seeds) == 64 * 64 and all(0 <= s < 2**63 for s in seeds)
    assert 0 <= mix(2**64 - 1, 2**64 - 1) < 2**63
    assert mix(-1) == mix(2**64 - 1)  # negative words are their 64-bit two's complement
    with pytest.raises(ValueError, match="64 bits"):
        mix(2**64)


def test_the_old_linear_mix_collisions_no_longer_collide():
    for seed, x in [(0, 1_000_003), (7, 2_000_010), (41, 123_456_789)]:
        assert seed * 1_000_003 + x == (seed + 1) * 1_000_003 + (x - 1_000_003)
        assert mix(seed, x) != mix(seed + 1, x - 1_000_003)


def test_mix_seeds_a_torch_generator():
    a = torch.randn(4, generator=torch.Generator().manual_seed(mix(2**64 - 1, 3)))
    b = torch.randn(4, generator=torch.Generator().manual_seed(mix(2**64 - 1, 3)))
    assert torch.equal(a, b)
