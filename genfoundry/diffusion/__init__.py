"""The training objective (flow matching), time sampling, loss weighting and ODE samplers."""

from genfoundry.diffusion.objective import LOSS_WEIGHTINGS, TIME_SAMPLERS, FlowMatching
from genfoundry.diffusion.samplers import generate, grid, image_noise, save_png, solve, to_uint8

__all__ = ["LOSS_WEIGHTINGS", "TIME_SAMPLERS", "FlowMatching", "generate", "grid", "image_noise",
           "save_png", "solve", "to_uint8"]
