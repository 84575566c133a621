"""Counter-based random numbers: value j of sample k is a pure function of (key_k, j).

Training noise drawn this way depends only on each sample's key (the trainer uses the run seed, the
step and the sample's position in the global batch), never on how a global batch is split over ranks
and micro-batches, and it costs a few element-wise passes on the device instead of a generator call
per sample. The mixing function is a 32-bit integer hash with good avalanche (the "lowbias32"
constants), applied twice per value; normals come from the Box-Muller transform.
"""

from __future__ import annotations

import math

import torch

from genfoundry.seeding import MASK32, hash32

_TWO_PI = 2 * math.pi


def _seeds(keys, device) -> torch.Tensor:
    """One 32-bit stream seed per key (keys are non-negative integers below 2**63)."""
    k = torch.as_tensor(list(keys) if not isinstance(keys, torch.Tensor) else keys, dtype=torch.int64, device=device)
    return hash32((k & MASK32) ^ hash32((k >> 32) & MASK32))


def _bits(seeds: torch.Tensor, counters: torch.Tensor, salt: int) -> torch.Tensor:
    """Hash of (seed, salt, counter) for every seed x counter pair: [len(seeds), len(counters)].

    The salt is folded into the seed, so streams of different salts share no values position-wise.
    """
    s = hash32(seeds ^ hash32(torch.tensor(salt * 0x9E3779B9 & MASK32, device=seeds.device)))
    x = hash32(s[:, None] ^ hash32(counters)[None, :])
    return hash32(x ^ s[:, None])


def _unit(bits: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Uniform in the open interval (0, 1) from the top 23 bits.

    23, not 24: float32 has a 24-bit significand, so the midpoint (2**24 - 0.5) / 2**24 of the top
    24-bit bucket rounds to exactly 1.0, which inverse CDFs such as logit-normal turn into inf.
    (k + 0.5) / 2**23 is exact in float32 for every k < 2**23, so the largest value is 1 - 2**-24.
    """
    return ((bits >> 9).to(dtype) + 0.5) * (1.0 / (1 << 23))


def keyed_uniform(keys, count: int, device, salt: int = 0) -> torch.Tensor:
    """[len(keys), count] uniforms in (0, 1); `salt` selects an independent stream."""
    counters = torch.arange(count, dtype=torch.int64, device=device)
    return _unit(_bits(_seeds(keys, device), counters, 2 * salt + 1))


def keyed_normal(keys, shape: tuple[int, ...], device, dtype=torch.float32, salt: int = 0) -> torch.Tensor:
    """[len(keys), *shape] standard normals."""
    count = math.prod(shape)
    seeds = _seeds(keys, device)
    counters = torch.arange(count, dtype=torch.int64, device=device)
    # Box-Muller in float64, rounded once: float32 log and cos take vectorised or scalar paths by the
    # tensor's size and alignment, and those differ in the last bit, so a value would depend on how
    # many others were drawn beside it; float64's last-bit differences vanish in the rounding.
    u1 = _unit(_bits(seeds, counters, 2 * salt + 1000), torch.float64)
    u2 = _unit(_bits(seeds, counters, 2 * salt + 1001), torch.float64)  # salts 1000+ are kept for normals
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(_TWO_PI * u2)
    return z.view(len(seeds), *shape).to(dtype)
