"""The training objective (flow matching), time sampling and loss weighting; sampling is genfoundry.sampling."""

from genfoundry.diffusion.objective import LOSS_WEIGHTINGS, TIME_SAMPLERS, FlowMatching

__all__ = ["LOSS_WEIGHTINGS", "TIME_SAMPLERS", "FlowMatching"]
