"""Rectified flow / flow matching with velocity prediction (Liu et al. 2022; Lipman et al. 2022).

Convention: t = 0 is data, t = 1 is noise, x_t = (1 - t) x_0 + t eps, and the network predicts the
velocity v = dx_t/dt = eps - x_0. Time sampling and loss weighting are plain registries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genfoundry.diffusion.noise import keyed_normal, keyed_uniform
from genfoundry.errors import ConfigError


def logit_normal(u: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """t = sigmoid(m + s z), z ~ N(0, 1): more weight on middle times (Esser et al. 2024, Eq. 19)."""
    return torch.sigmoid(mean + std * torch.special.ndtri(u))


def uniform(u: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    return u


# name -> t from a uniform u in (0, 1) (an inverse CDF), so that any source of uniforms can drive it
TIME_SAMPLERS = {"logit-normal": logit_normal, "uniform": uniform}

def _uniform_weight(t, gamma, sigma_data):
    return torch.ones_like(t)


def _cosmap(t, gamma, sigma_data):
    """Down-weights the nearly pure-noise end, where the velocity target is mostly unpredictable."""
    return 2.0 / (torch.pi * (1 - 2 * t + 2 * t * t))


def _min_snr(t, gamma, sigma_data):
    """Min-SNR-gamma (Hang et al. 2023) on the flow's SNR ((1 - t) / t)^2: the denoised image's error
    weighted by min(SNR, gamma). That error is t times the velocity's, so on the velocity loss the
    weight is t^2 min(SNR, gamma) = min((1 - t)^2, gamma t^2)."""
    return torch.minimum((1 - t) ** 2, gamma * t * t)


def _edm(t, gamma, sigma_data):
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the denoised image (Karras
    et al. 2022), with sigma = t / (1 - t); on the velocity loss: (1 - t)^2 + t^2 / sigma_data^2."""
    return (1 - t) ** 2 + (t / sigma_data) ** 2


# name -> per-sample loss weight from (t, min_snr_gamma, sigma_data)
LOSS_WEIGHTINGS = {"uniform": _uniform_weight, "cosmap": _cosmap, "min-snr": _min_snr, "edm": _edm}


class FlowMatching:
    """The training objective; draws all its randomness from the generator it is given."""

    def __init__(self, time_sampling: str = "logit-normal", loss_weighting: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, class_dropout: float = 0.1,
                 min_snr_gamma: float = 5.0, sigma_data: float = 0.5):
        if time_sampling not in TIME_SAMPLERS:
            raise ConfigError(f"unknown diffusion.time_sampling '{time_sampling}'; choose from {sorted(TIME_SAMPLERS)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"unknown diffusion.loss_weighting '{loss_weighting}'; "
                              f"choose from {sorted(LOSS_WEIGHTINGS)}")
        self.sample_t = TIME_SAMPLERS[time_sampling]
        self.weight = LOSS_WEIGHTINGS[loss_weighting]
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.class_dropout = class_dropout
        self.min_snr_gamma, self.sigma_data = min_snr_gamma, sigma_data

    def draw(self, x0: torch.Tensor, generator: torch.Generator):
        """(t, eps, drop) for a batch from a generator: the randomness of one training step."""
        n = x0.shape[0]
        u = torch.rand(n, generator=generator, device=x0.device).clamp_(1e-7, 1 - 1e-7)
        t = self.sample_t(u, self.logit_mean, self.logit_std)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        drop = torch.rand(n, generator=generator, device=x0.device) < self.class_dropout
        return t, eps, drop

    def draw_keyed(self, x0: torch.Tensor, keys) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, eps, drop) where sample i's randomness is a pure function of keys[i] (genfoundry.diffusion.noise).

        The trainer keys samples by their position in the global batch, so the noise does not depend
        on how the global batch is split over ranks and micro-batches.
        """
        u = keyed_uniform(keys, 2, x0.device)
        t = self.sample_t(u[:, 0], self.logit_mean, self.logit_std)
        eps = keyed_normal(keys, tuple(x0.shape[1:]), x0.device, x0.dtype)
        return t, eps, u[:, 1] < self.class_dropout

    def target(self, xt, t, y, x0, eps, drop) -> torch.Tensor:
        """What the network learns to predict at x_t: the flow's velocity eps - x_0."""
        return eps - x0

    def loss(self, model, x0, y, t, eps, drop=None) -> torch.Tensor:
        """Mean over the batch of w(t) ||v_theta(x_t, t, y) - target||^2 (per-pixel mean)."""
        tb = t.view(-1, *([1] * (x0.ndim - 1)))
        xt = (1 - tb) * x0 + tb * eps
        pred = model(xt, t, y, drop)
        target = self.target(xt, t, y, x0, eps, drop)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return (self.weight(t.float(), self.min_snr_gamma, self.sigma_data) * per_sample).mean()


class GuidanceDistillation(FlowMatching):
    """Guidance folded into the network (Meng et al. 2023, first stage, at one fixed weight): the
    student learns a teacher's classifier-free guided velocity v_u + w(t) (v_c - v_u) at x_t, so that
    one conditional pass gives what the teacher gives in two. Samples whose label is dropped learn the
    teacher's unconditional velocity, so the student keeps one. `weights(t)` is the guidance weight at
    each time (the sampling guidance schedule and interval); the teacher runs both halves in one call."""

    def __init__(self, teacher: torch.nn.Module, weights, **flow):
        super().__init__(**flow)
        self.teacher, self.weights = teacher, weights

    @torch.no_grad()
    def target(self, xt, t, y, x0, eps, drop) -> torch.Tensor:
        dropped = torch.zeros_like(y, dtype=torch.bool) if drop is None else drop
        both = self.teacher(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([y, y]),
                            torch.cat([dropped, torch.ones_like(dropped)]))
        cond, uncond = both.float().chunk(2)
        w = self.weights(t.float()).view(-1, *([1] * (xt.ndim - 1)))
        return uncond + w * (cond - uncond)
