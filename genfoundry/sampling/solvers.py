"""ODE solvers, time grids and guidance-scale schedules for the flow-matching velocity field.

These three registries are the one list of names that the config checks, the CLI offers and the docs
print. The module imports no torch: solvers only add and scale the tensors they are handed, and grids
and guidance scales are plain floats, so the config (and the torch-free report) can read the names.

Convention as in training (genfoundry.diffusion.objective): t = 1 is noise, t = 0 is data,
x_t = (1 - t) x_0 + t eps, and the network predicts v = eps - x_0, so x_0 = x_t - t v.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

# ---- time grids: (steps, shift) -> [1.0, ..., 0.0], steps + 1 decreasing times -----------------------

KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX, KARRAS_RHO = 0.002, 80.0, 7.0
SHIFT_BASE_DIMS = 4096  # the shift is 1 at 4,096 values per image (a 32 x 32 x 4 latent) when set to auto


def _uniform(steps: int, shift: float) -> list[float]:
    return [1.0 - i / steps for i in range(steps + 1)]


def _shifted(steps: int, shift: float) -> list[float]:
    """t' = s t / (1 + (s - 1) t) of the uniform grid (Esser et al. 2024, section 5.3.2): s > 1 spends
    more of the steps near noise, as larger images need; s < 1 more near the data."""
    return [shift * t / (1 + (shift - 1) * t) for t in _uniform(steps, shift)]


def _sigma_grid(steps: int, spacing: Callable[[float], float]) -> list[float]:
    """Times t = sigma / (1 + sigma) of a decreasing sigma grid (sigma = t / (1 - t) is the noise level
    of x_t / (1 - t)), from t = 1 through sigma_max ... sigma_min (spaced by `spacing` of i / (n - 1))
    to t = 0. The first sigma point is replaced by t = 1, where the solver starts from pure noise."""
    if steps == 1:
        return [1.0, 0.0]
    n = steps  # sigma points, the first of which becomes t = 1
    sigmas = [spacing(i / (n - 1)) for i in range(n)]
    return [1.0] + [s / (1 + s) for s in sigmas[1:]] + [0.0]


def _karras(steps: int, shift: float) -> list[float]:
    """EDM's grid (Karras et al. 2022, Eq. 5): sigma spaced evenly in sigma^(1/rho), rho = 7."""
    lo, hi = KARRAS_SIGMA_MIN ** (1 / KARRAS_RHO), KARRAS_SIGMA_MAX ** (1 / KARRAS_RHO)
    return _sigma_grid(steps, lambda u: (hi + u * (lo - hi)) ** KARRAS_RHO)


def _logsnr(steps: int, shift: float) -> list[float]:
    """Evenly spaced in log-SNR between the same sigma bounds (DPM-Solver's own choice)."""
    lo, hi = math.log(KARRAS_SIGMA_MIN), math.log(KARRAS_SIGMA_MAX)
    return _sigma_grid(steps, lambda u: math.exp(hi + u * (lo - hi)))


SCHEDULES: dict[str, Callable[[int, float], list[float]]] = {
    "uniform": _uniform, "shift": _shifted, "karras": _karras, "logsnr": _logsnr}


def auto_shift(values_per_image: int) -> float:
    """The resolution-dependent shift sqrt(values / 4096) (Esser et al. 2024): noise destroys a larger
    image more slowly, so its grid moves towards t = 1."""
    return math.sqrt(values_per_image / SHIFT_BASE_DIMS)


def time_grid(schedule: str, steps: int, shift: float = 1.0) -> list[float]:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown time schedule '{schedule}'; choose from {', '.join(SCHEDULES)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    ts = SCHEDULES[schedule](steps, shift)
    ts[0], ts[-1] = 1.0, 0.0
    return ts


# ---- guidance-scale schedules: g(t), with the scale at t being 1 + (w - 1) g(t) ------------------------
# Each g has mean 1 over t in [0, 1], so a schedule keeps the average strength of the constant scale w.

def _cos(u):
    return u.cos() if hasattr(u, "cos") else math.cos(u)  # a tensor of times, or one


GUIDANCE_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda t: 1.0,
    "linear": lambda t: 2.0 * (1.0 - t),                   # none at noise, most at the data
    "cosine": lambda t: 1.0 - _cos(math.pi * (1.0 - t)),  # the same, flat at both ends
}


def guidance_scale(cfg_scale: float, schedule: str, t, interval=(0.0, 1.0)):
    """The CFG weight at time t: 1 (no guidance) outside `interval` (Kynkaanniemi et al. 2024). `t` may
    also be a tensor of times (guidance distillation's targets): then a tensor of weights."""
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"unknown guidance schedule '{schedule}'; choose from {', '.join(GUIDANCE_SCHEDULES)}")
    if hasattr(t, "shape"):
        inside = ((t >= interval[0]) & (t <= interval[1])).to(t.dtype)
        return 1.0 + (cfg_scale - 1.0) * GUIDANCE_SCHEDULES[schedule](t) * inside
    if cfg_scale == 1.0 or not interval[0] <= t <= interval[1]:
        return 1.0
    return 1.0 + (cfg_scale - 1.0) * GUIDANCE_SCHEDULES[schedule](t)


# ---- solvers: (velocity, x, ts) -> x at t = 0; velocity(x, t) calls the network ------------------------


def _euler(velocity, x, ts):
    for t, s in zip(ts[:-1], ts[1:]):
        x = x + (s - t) * velocity(x, t)
    return x


def _heun(velocity, x, ts):
    """Heun's second-order method (Karras et al. 2022, Alg. 1), with an Euler last step to t = 0."""
    for t, s in zip(ts[:-1], ts[1:]):
        v = velocity(x, t)
        x_next = x + (s - t) * v
        if s > 0:
            x_next = x + (s - t) * 0.5 * (v + velocity(x_next, s))
        x = x_next
    return x


def _lam(t: float) -> float:
    """log(alpha / sigma) = log((1 - t) / t), the half log-SNR; -inf at pure noise, +inf at the data."""
    return math.inf if t == 0 else -math.inf if t == 1 else math.log((1 - t) / t)


def _dpmpp_2m(velocity, x, ts):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) on the denoised estimate x_0 = x - t v, with
    alpha = 1 - t and sigma = t. A step from t to s is x_s = (s / t) x_t + alpha_s (1 - e^-h) D, where
    h = lambda_s - lambda_t and D extrapolates the last two denoised estimates linearly in lambda.
    The first step (from pure noise, h infinite) and the last (to t = 0) are first order, which is
    the DDIM step and, for this interpolant, the Euler step."""
    prev_d = prev_h = None
    for t, s in zip(ts[:-1], ts[1:]):
        d = x - t * velocity(x, t)
        h = _lam(s) - _lam(t)
        step_d = d
        if prev_d is not None and math.isfinite(h) and math.isfinite(prev_h):
            r = prev_h / h
            step_d = (1 + 0.5 / r) * d - (0.5 / r) * prev_d
        x = step_d if s == 0 else (s / t) * x + ((1 - s) - s * (1 - t) / t) * step_d
        prev_d, prev_h = d, h
    return x


@dataclass(frozen=True)
class Solver:
    run: Callable            # (velocity, x, ts) -> x at t = 0
    evaluations: Callable    # steps -> network evaluations (NFE) per image, guidance not counted
    order: int
    about: str


SOLVERS: dict[str, Solver] = {
    "euler": Solver(_euler, lambda n: n, 1, "first order, one evaluation per step"),
    "heun": Solver(_heun, lambda n: 2 * n - 1, 2, "second order, two evaluations per step but the last"),
    "dpm++2m": Solver(_dpmpp_2m, lambda n: n, 2, "DPM-Solver++(2M): second order multistep, one evaluation per step"),
}


def steps_for(solver: str, nfe: int) -> int:
    """The number of steps that spends at most `nfe` evaluations (at least one step)."""
    return max(1, (nfe + 1) // 2) if solver == "heun" else max(1, nfe)
