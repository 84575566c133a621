"""Seeds derived from several integers: one mixing function for data order, augmentation and noise.

`hash32` is the "lowbias32" integer hash written with `^ >> * &` only, so it gives the same values on
Python ints and, element-wise, on int64 torch tensors. `mix` folds words through it into a 63-bit
seed that is the same on every run and platform.
"""

from __future__ import annotations

MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


def hash32(x):
    """A bijective mix of 32-bit values: a Python int or an int64 tensor, element-wise."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def mix(*words) -> int:
    """A seed in [0, 2**63) from integers in [0, 2**64), sensitive to their order and number.

    Negative words down to -2**63 are read as their 64-bit two's complement. The last word may be a
    tensor of non-negative int64 values: the result is then a tensor of the seeds mix(*words[:-1], w)
    for each of its elements, computed element-wise on its device.
    """
    a, b = 0x243F6A88, 0x85A308D3
    for pos, w in enumerate(words):
        if not isinstance(w, int) and pos == len(words) - 1 and hasattr(w, "dtype"):
            halves = (w & MASK32, w >> 32)  # int64 tensor: already within [0, 2**63)
        else:
            w = int(w)
            if not -(1 << 63) <= w < (1 << 64):
                raise ValueError(f"seed words must fit in 64 bits, got {w}")
            w &= _MASK64
            halves = (w & MASK32, w >> 32)
        for half in halves:
            a = hash32(a ^ half)
            b = hash32(b ^ a)
    a = hash32(a ^ (len(words) & MASK32))
    b = hash32(b ^ a)
    return (a << 31) | (b >> 1)
