"""The one progress bar of long non-training work (pack, curate, sample, eval, bench)."""

from __future__ import annotations

import os


def bar(total: int, desc: str, unit: str = "img", initial: int = 0, enabled: bool = True, file=None):
    """A tqdm bar (a context manager; `update(n)` counts n more) with rate and ETA, written to `file`
    (stderr by default). Shown only when `enabled`, on rank 0 (env RANK unset or "0") and when `file` is
    a terminal (tqdm's disable=None), so other ranks' logs and redirected output carry no
    carriage-return noise; a hidden bar still counts and costs next to nothing."""
    from tqdm import tqdm

    shown = enabled and os.environ.get("RANK", "0") == "0"
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=file, disable=None if shown else True,
                dynamic_ncols=True)
