"""Mixed precision: autocast settings and a dynamic loss scaler for fp16."""

from __future__ import annotations

import torch


class DynamicLossScaler:
    """Multiplies the loss by `scale`; halves it and skips the step on overflow, doubles it after
    `growth_interval` clean steps. Its whole state is two numbers, saved in the checkpoint."""

    def __init__(self, init_scale: float = 2.0**16, growth_interval: int = 1000, min_scale: float = 1.0):
        self.scale = float(init_scale)
        self.growth_interval = growth_interval
        self.min_scale = min_scale
        self.clean_steps = 0

    def unscale_and_check(self, grads: list[torch.Tensor]) -> bool:
        """Divides the gradients by the scale in place; True if every one is finite.

        One fused pass per device and dtype (torch's own AMP kernel), and one host sync for the answer.
        """
        groups: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g)
        found = []
        for (device, _), grads in groups.items():
            flag = torch.zeros(1, device=device)
            inv = torch.full((1,), 1.0 / self.scale, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, inv)
            found.append(flag.cpu())
        return not any(f.item() for f in found)

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

