"""Sampling a trained network.

- `solvers`: the registries of ODE solvers, time grids and guidance schedules (torch-free, so that the
  config and the report can read the names);
- `fast`: the network's fast path at sampling time (precision, compile, CUDA graphs);
- `generation`: `generate`, which turns (seed, index, label) into images and splits the work over ranks
  by global image index.

The functions of `generation` are importable from here; they load torch when first asked for.
"""

_LAZY = ("generate", "grid", "image_noise", "save_png", "solve", "to_uint8", "rank_batches")
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        from genfoundry.sampling import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'genfoundry.sampling' has no attribute '{name}'")
