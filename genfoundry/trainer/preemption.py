"""Preemption: after SIGTERM every rank finishes its step, the run saves a full checkpoint and exits 0,
all within `checkpoint.grace_s`. The ranks agree on the step to stop at (one may see the signal a
step later than another), through a small all-reduce on a gloo group of its own."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import torch

from genfoundry import accel


class Preemption:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.since: float | None = None
        self.group = torch.distributed.new_group(backend="gloo") if accel.distributed() else None
        self._timer: threading.Timer | None = None

    @contextlib.contextmanager
    def watching(self):
        """SIGTERM starts the grace time instead of ending the process (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = signal.signal(signal.SIGTERM, lambda signum, frame: self.request())
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, before)
            if self._timer is not None:
                self._timer.cancel()

    def request(self) -> None:
        if self.since is None:
            self.since = time.monotonic()
            self._timer = threading.Timer(self.grace_s, self._expired)
            self._timer.daemon = True
            self._timer.start()

    def agreed(self) -> bool:
        """True on every rank once any rank was asked to stop."""
        asked = self.since is not None
        if self.group is not None:
            flag = accel.all_reduce(torch.tensor([1 if asked else 0]), "max", group=self.group)
            if flag.item() and not asked:
                self.request()  # a peer was signalled first: this rank's grace starts now
            asked = bool(flag.item())
        return asked

    def _expired(self) -> None:
        print(f"SIGTERM: the grace time of {self.grace_s:g} s (checkpoint.grace_s) ran out before the checkpoint "
              f"was durable; exiting without it", file=sys.stderr, flush=True)
        os._exit(1)
