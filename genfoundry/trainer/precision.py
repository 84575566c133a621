"""Mixed precision: autocast settings and a dynamic loss scaler for fp16."""

from __future__ import annotations

import math

import torch


class DynamicLossScaler:
    """Multiplies the loss by `scale`; halves it and skips the step on overflow, doubles it after
    `growth_interval` clean steps. Its whole state is two numbers, saved in the checkpoint."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 1000, min_scale: float = 1.0):
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.clean_steps = 0

    def unscale_and_check(self, params) -> bool:
        """Divides gradients by the scale in place; True if every gradient is finite."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else torch.zeros(())
        return math.isfinite(norm.item())

    def update(self, finite: bool) -> None:
        if finite:
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self.scale *= 2.0
                self.clean_steps = 0
        else:
            self.scale = max(self.scale / 2.0, self.min_scale)
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])

