"""What training needs of a data loader, whichever kind it is."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Loader(Protocol):
    """One rank's micro-batches, resumable from its state.

    `state_dict()` holds the position in the global stream, so it survives a checkpoint: loading it
    continues with the next micro-batch. Saved at a global-batch boundary, it also resumes on another
    number of ranks or micro-batches, which then continue the same global stream.
    """

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (images in [-1, 1] NCHW float, labels) micro-batch."""
        ...

    def state_dict(self) -> dict:
        ...

    def load_state_dict(self, state: dict) -> None:
        ...
